"""The ruler blend's weight swept on a registered hold-out model: what each weight gives on the validation types
(where training chose it) and on the test types (which choose nothing).

The served year is (1 - w) x the regression head + w x the ruler mixture (`ModelConfig.ruler_blend`); training
fits w on its validation coin types (`calibrate.fit_levers`), about 65 types. This script scores the validation
and test coins once (`infer(with_heads)`), then serves them under every w from 0 to 1 with the model's other
levers as registered (`calibrate.Heads.served`, the function the network serves with; `levers.scored_heads`
checks that the registered levers reproduce the network's answers), and reports the MAE of each. It measures
how much the choice made on so few types costs on new ones; it changes nothing.

    COINYEAR_HOME=/tmp/s43obverse python benchmarks/blend_sweep.py --name obverse-seed43-xeon

About two minutes on 2 cores (one TTA pass over ~730 coins).
"""

from __future__ import annotations

from dataclasses import replace

from coinyear import evaluate
from coinyear.data import ImageCache, load_arrays

# isort: split
# this folder's modules: a script's own folder is first on sys.path when it runs
from common import write_results
from levers import registered_run, scored_heads  # a sibling benchmark script

WEIGHTS = tuple(round(0.1 * step, 1) for step in range(11))


def main(argv=None) -> int:
    args, registered, started = registered_run(__doc__, "blend_sweep", argv)
    network = registered.pyfunc.model
    config = network.config
    cache = ImageCache(registered.settings.cache_dir, config.image_size, config.grayscale)
    heads = {}
    for label, index in (("validation", registered.val_index), ("test", registered.test_index)):
        chosen = registered.rows.iloc[index]
        fronts, backs = load_arrays(chosen, cache)
        heads[label], _ = scored_heads(network, chosen, fronts, backs, registered.names)
    table = {}
    for weight in WEIGHTS:
        variant = replace(config, ruler_blend=weight)
        table[weight] = {label: evaluate.regression_metrics(part.served(variant)["year"], part.year_from,
                                                            part.year_to)["mae"]
                         for label, part in heads.items()}
    lines = [f"## {args.name}: {args.model} (version {registered.split['version']}, seed {registered.split['seed']}); "
             f"registered blend {config.ruler_blend}, temperature {config.portrait_temperature:.2f}, "
             f"ruler {'pooled' if config.ruler_pooled else 'per rotation'}", "",
             f"| blend w | validation MAE ({len(registered.val_index)} coins) | test MAE "
             f"({len(registered.test_index)} coins) |", "|---:|---:|---:|"]
    for weight, maes in table.items():
        mark = " (registered)" if abs(weight - config.ruler_blend) < 1e-9 else ""
        lines.append(f"| {weight:.1f}{mark} | {maes['validation']:.2f} | {maes['test']:.2f} |")
    write_results(args.out, args.name, {"model": args.model, "split": registered.split,
                                        "registered_blend": config.ruler_blend,
                                        "mae": {str(w): m for w, m in table.items()}}, lines, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
