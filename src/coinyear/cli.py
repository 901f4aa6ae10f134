"""The command line: parse, call one stage, print. `coinyear --help` lists the commands."""

# Over 400 lines on purpose: `build_parser` writes out every command's flags and help text (about 190 lines), so
# the whole command line reads in one place; the `cmd_*` functions read the settings and the arguments, call the
# stages and print what they answer (what they compute lives in the stages). The docstring is `--help`'s text.

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import NoReturn

from coinyear.config import configure_mlflow, get_settings


def _train_config(args, settings):
    """The recipe from settings with the flags given on the command line (`coinyear.recipe`, shared with
    `coinyear retrain`); a flag left out keeps the setting."""
    from coinyear.recipe import recipe_from_settings

    _, config = recipe_from_settings(
        settings, backbone=args.backbone, mode=args.mode, proj_dim=args.proj_dim, image_size=args.image_size,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, loss=args.loss, folds=args.folds,
        seed=args.seed, limit=args.limit, aux_weight=args.aux_weight,
        aux_heads=args.aux_heads.split(",") if args.aux_heads else None, reshoot=args.reshoot,
        early_scale=args.early_scale, full_size_epochs=args.full_size_epochs,
        frozen_blocks=args.frozen_blocks, ema_decay=args.ema_decay, portrait_input=args.portrait_input,
        ruler_blend=args.ruler_blend,
        # store_true flags: absent means "as configured", present turns the setting on (or off)
        grayscale=args.grayscale or None, horizontal_flip=args.horizontal_flip or None,
        ensemble=args.ensemble or None, tta=False if args.no_tta else None,
        pretrained=False if args.no_pretrained else None)
    return config


def cmd_train(args) -> int:
    from coinyear import registry
    from coinyear.config import set_torch_threads
    from coinyear.data import read_manifest
    from coinyear.train import RunOutcome, run_training

    settings = get_settings()
    if args.data:
        settings = settings.model_copy(update={"data_dir": args.data})
    set_torch_threads(settings)
    config = _train_config(args, settings)
    manifest = read_manifest(settings.data_dir, settings.min_year, settings.max_year, limit=config.limit,
                             seed=config.seed)
    print(manifest.report())
    outcome: RunOutcome
    if args.distributed is not None:
        from coinyear.distributed import run_distributed_training

        outcome = run_distributed_training(settings, config, manifest, args.distributed, gpu=args.gpu,
                                           cluster=args.cluster, register=not args.no_register)
        print(f"trained on {args.distributed} processes; peak memory per process (MiB): "
              + ", ".join(f"{mb:.0f}" for mb in outcome.peak_rss_mb))
    elif args.gpu or args.cluster:
        raise ValueError("--gpu and --cluster go with --distributed N")
    else:
        outcome = run_training(settings, config, manifest, register=not args.no_register)
    print(f"run {outcome.run_id}: validation MAE {outcome.metrics['val_mae']:.2f} years, "
          f"within ±10y {100 * outcome.metrics['val_within_10y']:.1f}%")
    if "test_mae" in outcome.metrics:  # the figure that means quality: coin types no choice was made on
        print(f"test coin types ({int(outcome.metrics['test_count'])} coins): MAE {outcome.metrics['test_mae']:.2f} "
              f"years, within ±10y {100 * outcome.metrics['test_within_10y']:.1f}%")
    if outcome.version:
        print(f"registered {settings.model_name} version {outcome.version}")
        if args.promote:
            registry.promote(settings, outcome.version, args.promote)
            print(f"{settings.model_name}@{args.promote} -> version {outcome.version}")
    return 0


def cmd_evaluate(args) -> int:
    import math

    from coinyear.data import TEST_SPLIT_RULE, read_manifest, split_test
    from coinyear.evaluate import evaluate_model, format_report

    settings = get_settings()
    configure_mlflow(settings)  # `models:/...` URIs resolve against our registry, not MLflow's default store
    # the seed only draws the --limit subset (with --holdout the one `coinyear train --limit N` drew); which coin
    # types are test types does not depend on it
    manifest = read_manifest(args.data or settings.data_dir, settings.min_year, settings.max_year, limit=args.limit,
                             seed=settings.seed if args.holdout else 0)
    if not args.json:
        print(manifest.report())
    rows = manifest.rows
    if args.holdout:
        # the test coin types (a fixed hash of the type): no model trained, stopped early or calibrated on them
        rows = rows.iloc[split_test(rows)[1]].reset_index(drop=True)
        if len(rows) == 0:
            raise ValueError("no coin of a test type among these rows: nothing to score (a larger --limit?)")
    report = evaluate_model(args.model, rows, progress=not args.json)
    report["data"] = {**manifest.summary(), "scored": len(rows), "holdout": bool(args.holdout),
                      "test_split": TEST_SPLIT_RULE if args.holdout else None}
    # NaN (a metric with no coin to measure it on) is not JSON: null
    report["metrics"] = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in report["metrics"].items()}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        scope = f"the test coin types ({TEST_SPLIT_RULE})" if args.holdout else "every coin of the manifest"
        print(format_report(report["metrics"], f"{args.model} on {scope}:"))
    return 0


def cmd_lake(args) -> int:
    from coinyear.lake import open_lake
    from coinyear.lake.spool import replay_quarantine

    settings = get_settings()
    outcomes = replay_quarantine(open_lake(settings), args.table, settings.spool_dir / args.table)
    if args.json:
        print(json.dumps(outcomes, indent=2))
    elif outcomes:
        print("\n".join(f"{segment}: {outcome}" for segment, outcome in sorted(outcomes.items())))
    else:
        print(f"nothing in quarantine for {args.table}")
    # a segment that still fails stays in quarantine: the command failed at what it was asked to do
    return 1 if any(outcome.startswith("not committed") for outcome in outcomes.values()) else 0


def cmd_demo(args) -> int:
    from coinyear.jobs.demo import run_demo

    run_demo(get_settings(), source=args.source, setup_seconds=args.setup_seconds, limit=args.limit)
    return 0


def cmd_models(args) -> int:
    from coinyear import registry

    settings = get_settings()
    if args.models_command == "promote":
        previous = registry.promote(settings, args.version, args.to)
        print(f"{settings.model_name}@{args.to}: version {previous or '-'} -> {args.version}")
    elif args.models_command == "rollback":
        current, target = registry.rollback(settings)
        print(f"{settings.model_name}@production: version {current} -> {target} (rolled back)")
    else:
        versions = registry.list_versions(settings)
        if args.json:
            print(json.dumps([v.__dict__ for v in versions], indent=2, default=str))
            return 0
        if not versions:
            print(f"no versions of {settings.model_name} registered yet")
            return 0
        # test_*: the test coin types; versions trained before the test split have only val_* (shown then)
        print(f"{'version':>7}  {'aliases':<20} {'MAE':>8} {'±10y':>6}  {'measured on':<11}  decision")
        for v in versions:
            scope = "test" if "test_mae" in v.metrics else "val"
            mae = v.metrics.get(f"{scope}_mae")
            within = v.metrics.get(f"{scope}_within_10y")
            decision = v.tags.get("decision", "")
            if v.tags.get("decision_reason"):
                decision += f" ({v.tags['decision_reason']})"
            print(f"{v.version:>7}  {','.join(v.aliases) or '-':<20} "
                  f"{'-' if mae is None else f'{mae:.2f}':>8} {'-' if within is None else f'{100 * within:.0f}%':>6}"
                  f"  {'test types' if scope == 'test' else 'validation':<11}  {decision}")
    return 0


def cmd_retrain(args) -> int:
    from dataclasses import asdict

    from coinyear.config import set_torch_threads
    from coinyear.jobs.retrain import run_retrain
    from coinyear.jobs.task_values import set_task_value

    settings = get_settings()
    set_torch_threads(settings)
    result = run_retrain(settings, dry_run=args.dry_run, force=args.force)
    print(json.dumps(asdict(result), indent=2) if args.json else result.report())
    set_task_value("decision", result.decision)  # shown in the job run; its deploy task runs whatever it says
    return 1 if result.decision == "failed" else 0  # recorded and reported, but a failed job run all the same


def cmd_deploy(args) -> int:
    from coinyear.deploy import as_json
    from coinyear.targets import run_deploy

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    result = run_deploy(get_settings(), version=args.version, dry_run=args.dry_run, progress=progress)
    print(as_json(result) if args.json else result.report())
    return result.exit_status


def cmd_scheduler(args) -> int:
    from coinyear.jobs.scheduler import run_scheduler

    run_scheduler(get_settings())
    return 0


def cmd_ingest_payloads(args) -> int:
    from dataclasses import asdict

    from coinyear.databricks.payloads import ingest_payloads

    result = ingest_payloads(get_settings())
    print(json.dumps(asdict(result), indent=2) if args.json else result.report())
    return 0


def cmd_monitor(args) -> int:
    from coinyear.jobs.monitor import run_monitor

    table = run_monitor(get_settings())
    if args.json:
        print(table.to_json(orient="records", date_format="iso", indent=2))
    elif len(table) == 0:
        print("no requests in the inference log yet")
    else:
        columns = ["date", "model_version", "requests", "error_rate", "latency_p50_ms", "latency_p99_ms",
                   "prediction_p50", "prediction_psi", "brightness_psi", "feedback_rows", "feedback_mae"]
        print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


def cmd_data(args) -> int:
    settings = get_settings()
    if args.data_command == "fetch":
        from coinyear.reference import fetch

        print(fetch(settings.data_dir, settings.home_dir, args.source, args.dest,
                    fallback_source=settings.data_source).message)
        return 0
    from coinyear.data import import_collection, read_manifest

    if args.data_command == "import":
        out = args.out or settings.home_dir / "datasets" / "imported"
        manifest = import_collection(args.images, args.csv, out, settings.min_year, settings.max_year)
        print(manifest.report())
        print(f"manifest written to {out}/manifest.csv")
    else:
        manifest = read_manifest(args.data or settings.data_dir, settings.min_year, settings.max_year)
        print(json.dumps(manifest.summary(), indent=2) if args.json else manifest.report())
    return 0


def cmd_predict(args) -> int:
    import os
    from dataclasses import asdict

    # as in `coinyear serve`: idle OpenMP workers would spin on the cores the photo decoders need between
    # forward passes (set before torch loads OpenMP)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from coinyear import predict
    from coinyear.config import set_torch_threads

    settings = get_settings()
    sources = sum(bool(x) for x in (args.photos, args.images, args.csv))
    if sources != 1 or (args.photos and len(args.photos) != 2):
        raise ValueError("give FRONT BACK, or --images DIR, or --csv FILE (one of them)")
    if args.engine == "spark":
        if not args.images or not args.out_table:
            raise ValueError("--engine spark takes --images DIR and --out-table TABLE")
        from coinyear.spark import spark_session

        written = predict.predict_spark(settings, spark_session(), args.images, args.out_table, args.model,
                                        args.interval)
        print(json.dumps(written, indent=2) if args.json else
              f"{written['scored']} coins ({written['errors']} with an error) -> table {written['table']}, "
              f"{written['model_name']} version {written['model_version']}")
        return 0
    set_torch_threads(settings)
    model = predict.load_scoring_model(settings, args.model)
    if args.photos:
        front, back = args.photos
        answer = predict.predict_pair(model, front, back, interval=args.interval)
        if args.json:
            print(json.dumps(answer, indent=2))
        else:
            from coinyear.years import span_text, year_label

            if answer.get("warning"):  # said before the number, so nobody reads the date without it
                print(f"Warning: {answer['warning']}.")
            extra = (f" ({int(args.interval * 100)}% range {year_label(answer['low'])} .. "
                     f"{year_label(answer['high'])})" if args.interval else "")
            print(f"{year_label(answer['year'])}{extra}  [{model.name} version {model.version}]")
            if answer.get("span"):
                print(f"The model knows {span_text(answer['span'])}.")
        return 0
    if not args.out:
        raise ValueError("--out FILE (.csv or .parquet) is needed with --images or --csv")
    pairs = predict.pair_folder(args.images) if args.images else predict.pair_csv(args.csv)
    result = predict.predict_collection(model, pairs, args.out, args.interval, args.chunk_size, args.batch_size,
                                        progress=not args.json)
    print(json.dumps(asdict(result), indent=2) if args.json else
          f"{result.scored} coins dated ({result.errors} with an error, {result.skipped} already in the output) "
          f"-> {result.out} with {result.model_name} version {result.model_version}")
    return 0


def cmd_ui(args) -> NoReturn:
    """Replace this process with `streamlit run` on the app, so a signal to it stops the UI itself."""
    import os
    from pathlib import Path

    import coinyear.ui
    from coinyear.ui.access import check_bind

    settings = get_settings()
    host = args.host or settings.host
    check_bind(settings, host)  # the Models page moves production: no open UI without tokens
    app = Path(coinyear.ui.__file__).with_name("app.py")
    os.execv(sys.executable, [sys.executable, "-m", "streamlit", "run", str(app),
                              "--server.address", host,
                              "--server.port", str(args.port or settings.ui_port),
                              "--server.headless", "true", "--server.fileWatcherType", "none",
                              "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal"])


def cmd_serve(args) -> int:
    import os

    # Idle OpenMP workers spin by default; in the gateway they would steal the cores that the event loop, the
    # photo decoders and the spool thread need between forward passes. Set before torch loads OpenMP.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from coinyear.serve import serve
    from coinyear.targets import gateway_backend

    settings = get_settings()
    serve(settings, host=args.host, port=args.port, access_log=args.access_log, backend=gateway_backend(settings))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coinyear", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train (grouped K-fold or hold-out), log to MLflow, register")
    train.add_argument("--data", help="dataset folder with manifest.csv (default COINYEAR_DATA_DIR)")
    train.add_argument("--backbone", choices=["resnet18", "mobilenet_v3_small", "efficientnet_lite0",
                                              "efficientnet_lite1", "efficientnet_lite2"])
    train.add_argument("--mode", choices=["shared", "dual"])
    train.add_argument("--proj-dim", type=int, help="projection after fusion; 0 = none")
    train.add_argument("--grayscale", action="store_true")
    train.add_argument("--image-size", type=int)
    train.add_argument("--epochs", type=int)
    train.add_argument("--folds", type=int, help="K for grouped K-fold; 0 = one grouped hold-out")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--loss", choices=["interval", "mse"])
    train.add_argument("--limit", type=int, help="train on a random subset of N coins")
    train.add_argument("--seed", type=int)
    train.add_argument("--horizontal-flip", action="store_true", help="add flips (not advised: mirrors legends)")
    train.add_argument("--no-tta", action="store_true", help="one pass per coin instead of 5 rotations (faster "
                       "serving; constant-width intervals)")
    train.add_argument("--ensemble", action="store_true", help="with --folds K: serve the K fold models averaged")
    train.add_argument("--aux-weight", type=float, help="weight of the auxiliary heads' loss "
                       "(default COINYEAR_AUX_WEIGHT, 0 = none)")
    train.add_argument("--aux-heads", help="comma-separated columns the auxiliary heads learn: portrait, mint, "
                       "denomination (default COINYEAR_AUX_HEADS, portrait)")
    train.add_argument("--reshoot", type=float, help="share of training photos re-shot as a collector would take "
                       "them (default COINYEAR_RESHOOT, 0.5; 0 = none)")
    train.add_argument("--early-scale", type=float, help="progressive resizing: the epochs before the last "
                       "--full-size-epochs train at this share of the image size (default COINYEAR_EARLY_SCALE; "
                       "1 = full size throughout)")
    train.add_argument("--full-size-epochs", type=int, help="the last epochs, trained at the image size served "
                       "(default COINYEAR_FULL_SIZE_EPOCHS)")
    train.add_argument("--frozen-blocks", type=int, help="keep the backbone's stem and this many first stages as "
                       "pretrained (default COINYEAR_FROZEN_BLOCKS; 0 = train every weight)")
    train.add_argument("--ema-decay", type=float, help="validate and keep the weights' moving average with this "
                       "decay per step (default COINYEAR_EMA_DECAY; 0 = off)")
    train.add_argument("--portrait-input", choices=["fused", "obverse"], help="what the portrait head reads: both "
                       "sides' fused embedding or the obverse's features alone (default COINYEAR_PORTRAIT_INPUT)")
    train.add_argument("--ruler-blend", help="the ruler mixture's weight in the served year, 0 to 1, or 'fit' "
                       "(chosen on the validation coins; default COINYEAR_RULER_BLEND, 0.5)")
    train.add_argument("--no-pretrained", action="store_true", help="do not load ImageNet weights")
    train.add_argument("--no-register", action="store_true")
    train.add_argument("--promote", choices=["staging", "production"], help="set this alias on the new version")
    train.add_argument("--distributed", type=int, metavar="N", help="train with N DDP processes under Spark's "
                       "TorchDistributor (one grouped hold-out; not with --folds)")
    train.add_argument("--gpu", action="store_true", help="with --distributed: one GPU per process (NCCL)")
    train.add_argument("--cluster", action="store_true", help="with --distributed: run the processes as Spark "
                       "tasks on the cluster's executors (Databricks), not on this machine")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("evaluate", help="score a manifest with a registered model")
    evaluate.add_argument("--model", required=True, help="e.g. models:/coinyear@production")
    evaluate.add_argument("--data", help="dataset folder with manifest.csv (default COINYEAR_DATA_DIR)")
    evaluate.add_argument("--limit", type=int)
    evaluate.add_argument("--holdout", action="store_true", help="score only the test coin types (a fixed hash of "
                          "the coin type): no model, K-fold refit or retraining candidate trains or chooses on them")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)

    models = commands.add_parser("models", help="registered versions, promotion and rollback")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    listing = models_commands.add_parser("list", help="versions with aliases, metrics and decisions")
    listing.add_argument("--json", action="store_true")
    promote = models_commands.add_parser("promote", help="point an alias at a version")
    promote.add_argument("version")
    promote.add_argument("--to", required=True, choices=["staging", "production"])
    models_commands.add_parser("rollback", help="production back to the version before")
    models.set_defaults(func=cmd_models)

    retrain = commands.add_parser("retrain", help="feedback -> candidate model -> promote or reject (one run)")
    retrain.add_argument("--dry-run", action="store_true", help="ingest and clean only; report, change nothing")
    retrain.add_argument("--force", action="store_true", help="retrain even without new feedback")
    retrain.add_argument("--json", action="store_true")
    retrain.set_defaults(func=cmd_retrain)
    scheduler = commands.add_parser("scheduler", help="run the retraining on COINYEAR_RETRAIN_CRON until stopped")
    scheduler.set_defaults(func=cmd_scheduler)
    monitor = commands.add_parser("monitor", help="daily health and drift metrics -> the monitoring table")
    monitor.add_argument("--json", action="store_true")
    monitor.set_defaults(func=cmd_monitor)
    deploy = commands.add_parser("deploy", help="make the serving target (COINYEAR_DEPLOY_TARGET) serve the "
                                 "production version: canary, watch, promote or roll back")
    deploy.add_argument("--version", help="deploy this version (it becomes production), e.g. after a rollback")
    deploy.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    deploy.add_argument("--json", action="store_true")
    deploy.set_defaults(func=cmd_deploy)
    ingest = commands.add_parser("ingest-payloads", help="Databricks: the endpoint's payload table -> inference_log, "
                                 "feedback files in the volume -> feedback (exactly once)")
    ingest.add_argument("--json", action="store_true")
    ingest.set_defaults(func=cmd_ingest_payloads)

    predict = commands.add_parser(
        "predict", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="date one coin (FRONT BACK) or a whole collection (--images DIR | --csv FILE --out FILE)",
        description="Date one coin, or every coin of a folder or CSV, with a registered model.\n\n"
        "Folder naming rule (--images DIR; files directly in DIR, case-insensitive):\n"
        "  <id>_front.<ext> + <id>_back.<ext>   separator _ - . or space; side word front|obverse|heads or\n"
        "                                       back|reverse|tails (e.g. 17-obverse.jpg + 17-reverse.jpg)\n"
        "  heads<id>.<ext> + tails<id>.<ext>    the OCRE form (heads00001.jpg + tails00001.jpg)\n"
        "  <ext>: jpg jpeg png webp tif tiff bmp gif; other files are ignored.\n"
        "CSV (--csv FILE): columns front and back (paths relative to the CSV's folder, or absolute); other\n"
        "columns (e.g. coin_id, the restart key; default the row number) are copied to the output.\n"
        "Output: one row per coin with year (+ low, high, out_of_distribution with --interval), error,\n"
        "model_name, model_version, scored_at. A rerun skips the coin ids already in --out.")
    predict.add_argument("photos", nargs="*", metavar="FRONT BACK", help="the two photos of one coin")
    predict.add_argument("--images", help="folder of photo pairs (naming rule above)")
    predict.add_argument("--csv", help="CSV with front and back columns")
    predict.add_argument("--out", help="results .csv (appended) or .parquet (a folder of part files)")
    predict.add_argument("--model", help="model URI (default models:/<COINYEAR_MODEL_NAME>@production)")
    predict.add_argument("--interval", type=float, default=0.0, help="coverage level, e.g. 0.9: add the "
                         "conformal range and the out-of-distribution flag")
    predict.add_argument("--engine", choices=["local", "spark"], default="local",
                         help="spark: score with mlflow.pyfunc.spark_udf and write --out-table")
    predict.add_argument("--out-table", help="table for --engine spark (a Unity Catalog name on Databricks)")
    predict.add_argument("--chunk-size", type=int, default=256, help="coins written per chunk (restart unit)")
    predict.add_argument("--batch-size", type=int, default=32, help="coins per forward pass")
    predict.add_argument("--json", action="store_true")
    predict.set_defaults(func=cmd_predict)

    lake = commands.add_parser("lake", help="operate the local lake's write spools")
    lake_commands = lake.add_subparsers(dest="lake_command", required=True)
    replay = lake_commands.add_parser(
        "replay-quarantine", help="commit a table's quarantined spool segments once the table takes them again",
        description="Commits the rows of the quarantined segments of a table's spool that are not in the table "
                    "yet, each exactly once; run it while the gateway that owns the spool is stopped.")
    replay.add_argument("--table", required=True, choices=["inference_log", "feedback"])
    replay.add_argument("--json", action="store_true")
    replay.set_defaults(func=cmd_lake)

    demo = commands.add_parser(
        "demo", help="the main job (make demo): reference data, train, register, promote, score the test coin "
                     "types, then a summary of times and figures")
    demo.add_argument("--source", help="where to get the reference data when no copy exists (as `data fetch`)")
    demo.add_argument("--setup-seconds", type=float, help="set-up time to show in the summary (make demo)")
    demo.add_argument("--limit", type=int, help="train on a random subset of N coins (a quick look)")
    demo.set_defaults(func=cmd_demo)

    data = commands.add_parser("data", help="fetch the reference data, check a dataset or import your own collection")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    check = data_commands.add_parser("check", help="validate a manifest and report dropped rows")
    check.add_argument("--data")
    check.add_argument("--json", action="store_true")
    imported = data_commands.add_parser("import", help="turn a folder of photos + CSV into a manifest")
    imported.add_argument("--images", required=True)
    imported.add_argument("--csv", required=True)
    imported.add_argument("--out", help="output folder (default COINYEAR_HOME/datasets/imported)")
    fetched = data_commands.add_parser(
        "fetch", help="get the OCRE reference photos the shipped manifest names, checked (nothing if a copy exists)",
        description="Make sure the reference data is there: COINYEAR_DATA_DIR, else ../shared/data/ocre, else "
                    "COINYEAR_HOME/data/ocre, which a fetch fills from the pinned upstream archive "
                    "(COINYEAR_DATA_SOURCE), checking every photo's SHA-256.")
    fetched.add_argument("--source", help="URL, local .tar.gz or folder holding images/ (default: a local copy, "
                                          "else COINYEAR_DATA_SOURCE)")
    fetched.add_argument("--dest", type=Path, help="where to put it (default COINYEAR_DATA_DIR, else "
                                                  "COINYEAR_HOME/data/ocre)")
    data.set_defaults(func=cmd_data)

    serve = commands.add_parser("serve", help="REST gateway serving models:/<name>@production, logging to Delta")
    serve.add_argument("--host", help="address to bind (default COINYEAR_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default COINYEAR_PORT, 8080)")
    serve.add_argument("--access-log", action="store_true", help="print one line per HTTP request")
    serve.set_defaults(func=cmd_serve)
    ui = commands.add_parser("ui", help="the Streamlit front end: predict, correct, monitor, manage models")
    ui.add_argument("--host", help="address to bind (default COINYEAR_HOST)")
    ui.add_argument("--port", type=int, help="port (default COINYEAR_UI_PORT, 8501)")
    ui.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"coinyear: error: {error}", file=sys.stderr)
        return 2


def run() -> NoReturn:
    """The `coinyear` console command: `main`'s status as the process's exit status.

    The garbage collector runs once more while every library is still loaded. Arrow's dataset scanners (pyarrow,
    which delta-rs reads through) hold native worker threads until they are collected; collected only in the
    interpreter's final teardown, after Arrow's thread pools are gone, they can abort a finished command
    ("terminate called without an active exception", exit 134: apache/arrow#39862 and #34314,
    delta-io/delta-rs#2184). That abort was seen here in 4 of 25 skipped retrainings under load (2026-11-27) and
    was then hidden by an `os._exit`; with today's libraries it did not recur in 83 runs without it under load
    5-7 (2026-12-06). tests/faults/test_cli_exit.py runs the command that showed it."""
    import gc

    code = main()
    gc.collect()
    sys.exit(code)


def job() -> None:
    """The `coinyear-job` entry point that the Databricks bundle's python_wheel_tasks call: the same commands as
    `coinyear`, but a wheel task calls its entry point inside the driver's Python process (sys.argv = the task's
    parameters), so this returns on success and raises on failure. It never exits the interpreter: `run`'s
    sys.exit would end the driver's REPL with it, and the run would be reported failed."""
    try:
        code = main(sys.argv[1:])
    except SystemExit as stop:  # argparse: --help (0) or a usage error (2)
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    sys.stdout.flush()
    if code:
        raise RuntimeError(f"coinyear {' '.join(sys.argv[1:])} failed with exit status {code}")


if __name__ == "__main__":
    run()
