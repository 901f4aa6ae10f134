"""The OCRE reference data: where it is, and how a fresh machine gets it (`coinyear data fetch`).

The package ships the reference manifest and the SHA-256 of every photo it names (`reference-data/`); the photos
come from the pinned upstream archive, or from a mirror of it, a local copy of the archive or a local folder, and
each is checked on the way in. A copy is looked for in this order: COINYEAR_DATA_DIR if set;
`../shared/data/ocre` (a local mirror, read in place); COINYEAR_HOME/data/ocre (what a fetch writes).

A fetch never leaves anything half-written where it would be used: the photos go into a temporary sibling
folder that is renamed into place only once every photo has passed its checksum. The upstream archive holds
about 500 more coins than the manifest, kept out on purpose for evaluation outside the project: only the
photos the manifest names are ever extracted.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import os
import re
import secrets
import shutil
import sys
import tarfile
import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

UPSTREAM_REPOSITORY = "RodolfoFerro/coins_scraping"
UPSTREAM_COMMIT = "09444fe42656dc47175af5c8c36c3aeb07daae42"
SOURCE_URL = f"https://codeload.github.com/{UPSTREAM_REPOSITORY}/tar.gz/{UPSTREAM_COMMIT}"
# Relative to the working directory: the project's checkout sits beside `shared/` (commands run from its root).
SHARED_DIR = Path("../shared/data/ocre")
HOME_SUBDIR = Path("data") / "ocre"
SHIPPED_DIR = Path(__file__).resolve().parent / "reference-data"
SHIPPED_MANIFEST = SHIPPED_DIR / "manifest.csv"
SHIPPED_CHECKSUMS = SHIPPED_DIR / "SHA256SUMS"
SHIPPED_NOTICE = SHIPPED_DIR / "NOTICE.md"

CHUNK = 1 << 20
# Only `images/<file>`: the names come from a manifest, and this keeps any other archive path from being written.
PHOTO_NAME = re.compile(r"images/(?!\.\.?$)[^/\\]+")


class ReferenceDataError(RuntimeError):
    """The reference data cannot be got, or a copy fails its checks; the message is one line for the user."""


class OfflineError(ReferenceDataError):
    """The download failed on the network after its retries, and no copy was found."""


class _Retryable(Exception):
    """A download attempt that may succeed if tried again (a short body, a server error)."""


def resolve_data_dir(configured: str | Path | None, home: str | Path) -> Path:
    """Where the reference data is: `configured` (COINYEAR_DATA_DIR) when set; else `../shared/data/ocre` when it
    holds a manifest; else HOME/data/ocre, where `coinyear data fetch` puts it (which may not exist yet)."""
    if configured:
        return Path(configured).expanduser()
    if (SHARED_DIR / "manifest.csv").is_file():
        return SHARED_DIR.resolve()
    return Path(home).expanduser().resolve() / HOME_SUBDIR


@dataclass(frozen=True)
class Reference:
    """The reference set a copy must hold: its manifest file and each photo's SHA-256 (`images/<file>` → hex)."""

    manifest: Path
    checksums: dict[str, str]
    checksums_file: Path


def load_reference(manifest: Path | None = None, checksums: Path | None = None) -> Reference:
    """The shipped reference (or a small one, for tests): `checksums` in `sha256sum` format names each photo the
    manifest names, and only those."""
    import csv

    manifest = manifest or SHIPPED_MANIFEST
    checksums_file = checksums or SHIPPED_CHECKSUMS
    sums: dict[str, str] = {}
    for line in checksums_file.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or not PHOTO_NAME.fullmatch(name):
            raise ReferenceDataError(f"{checksums_file}: not a `<sha256>  images/<file>` line: {line!r}")
        sums[name] = digest
    with manifest.open(newline="") as handle:
        named = {row[side] for row in csv.DictReader(handle) for side in ("obverse", "reverse") if row[side]}
    if named != set(sums):
        odd = sorted(named ^ set(sums))
        raise ReferenceDataError(f"{checksums_file} and {manifest} disagree on {len(odd)} photos, e.g. {odd[0]}")
    return Reference(manifest, sums, checksums_file)


def is_reference_copy(folder: Path, reference: Reference) -> bool:
    """Whether `folder` holds this reference set's manifest (then its photos are checked against the sums)."""
    copy = folder / "manifest.csv"
    return copy.is_file() and copy.read_bytes() == reference.manifest.read_bytes()


def verify_copy(folder: Path, reference: Reference) -> None:
    """Check every photo of a copy against its SHA-256; the first missing or changed one is the error."""
    for name, expected in reference.checksums.items():
        path = folder / name
        if not path.is_file():
            raise ReferenceDataError(f"photo {name} is missing from {folder}")
        with path.open("rb") as handle:
            actual = hashlib.file_digest(handle, "sha256").hexdigest()
        if actual != expected:
            raise ReferenceDataError(f"photo {name} in {folder} fails its SHA-256 check (expected {expected}, "
                                     f"found {actual})")


@dataclass(frozen=True)
class Fetched:
    """Where the reference data is after a fetch, whether this fetch wrote it, and the line to tell the user."""

    path: Path
    fetched: bool
    message: str


def fetch(data_dir: Path, home: Path, source: str | None = None, dest: Path | None = None, *,
          fallback_source: str = SOURCE_URL, manifest: Path | None = None, checksums: Path | None = None,
          retries: int = 3, progress: bool | None = None) -> Fetched:
    """Make sure a checked copy of the reference data exists, fetching it when there is none.

    `data_dir` is where the settings look (COINYEAR_DATA_DIR, else `../shared/data/ocre` if present, else
    HOME/data/ocre) and the destination unless `dest` is given. A destination that already holds the reference
    manifest is only checked. Otherwise the photos come from `source` (a URL, a local .tar.gz or a folder holding
    `images/`), else from a checked local copy elsewhere in that order, else from `fallback_source` (the pinned
    upstream archive unless COINYEAR_DATA_SOURCE says otherwise). `manifest` and `checksums` replace the shipped
    reference (tests use a few photos); `progress` None shows the download bar only on a terminal.
    """
    reference = load_reference(manifest, checksums)
    target = Path(dest or data_dir).expanduser().resolve()
    present = _present(target, reference, explicit=dest is not None)
    if present:
        return present
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target):
        present = _present(target, reference, explicit=dest is not None)  # another fetch finished meanwhile
        if present:
            return present
        for stale in target.parent.glob(f".{target.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a fetch that was killed
        chosen = source or _local_copy(reference, target, (data_dir, SHARED_DIR, Path(home) / HOME_SUBDIR))
        chosen = chosen or fallback_source
        _install(str(chosen), target, reference, retries=retries, progress=progress)
    return Fetched(target, True, f"reference data fetched from {chosen} into {target}: "
                                 f"{len(reference.checksums):,} photos checked against SHA256SUMS")


def _present(target: Path, reference: Reference, explicit: bool) -> Fetched | None:
    """What is at the destination already: a checked copy, the user's own dataset, or nothing (None)."""
    if (target / "manifest.csv").is_file():
        if not is_reference_copy(target, reference):
            if explicit:
                raise ReferenceDataError(f"{target} holds another dataset (its manifest.csv is not the reference "
                                         "manifest): choose another --dest")
            return Fetched(target, False, f"using the dataset at {target} as it is (not the OCRE reference "
                                          "manifest, so its photos are not checked)")
        verify_copy(target, reference)
        return Fetched(target, False, f"reference data already at {target}: {len(reference.checksums):,} photos "
                                      "match SHA256SUMS, nothing fetched")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ReferenceDataError(f"{target} exists and is not a copy of the reference data (no manifest.csv): "
                                 "remove it or choose another --dest")
    return None


@contextmanager
def _lock(target: Path) -> Iterator[None]:
    """One fetch at a time per destination: two would append to the same download and race to the rename."""
    with target.with_name(f".{target.name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _local_copy(reference: Reference, target: Path, candidates: Iterable[Path]) -> str | None:
    """The first candidate folder, other than the destination, that holds this reference manifest."""
    for folder in candidates:
        folder = Path(folder).expanduser().resolve()
        if folder != target and is_reference_copy(folder, reference):
            return str(folder)
    return None


def _install(source: str, target: Path, reference: Reference, *, retries: int, progress: bool | None) -> None:
    """Fill a temporary sibling of `target` from `source`, checking every photo, then rename it into place."""
    downloaded = None
    if re.match(r"https?://", source):
        downloaded = _download(source, target, retries=retries, progress=progress)
        archive: Path | None = downloaded
    else:
        local = Path(source).expanduser()
        if not local.exists():
            raise ReferenceDataError(f"source {source} does not exist (give a URL, a .tar.gz or a folder with images/)")
        archive = None if local.is_dir() else local
    # not tempfile.mkdtemp: its folder would be private (0700) once renamed; this one has the umask's permissions
    staging = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    staging.mkdir()
    try:
        (staging / "images").mkdir()
        if archive is None:
            _copy_folder(Path(source).expanduser(), staging, reference)
        else:
            _extract(archive, staging, reference)
        shutil.copyfile(reference.manifest, staging / "manifest.csv")
        shutil.copyfile(reference.checksums_file, staging / "SHA256SUMS")
        shutil.copyfile(SHIPPED_NOTICE, staging / "NOTICE.md")
        os.replace(staging, target)  # atomic; an existing empty destination folder is replaced
    except ReferenceDataError:
        if downloaded is not None:
            downloaded.unlink(missing_ok=True)  # it is not the pinned archive: a rerun must download it afresh
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if downloaded is not None:
        downloaded.unlink()


def _copy_folder(folder: Path, staging: Path, reference: Reference) -> None:
    if not (folder / "images").is_dir():
        raise ReferenceDataError(f"source folder {folder} has no images/ folder")
    for name, expected in reference.checksums.items():
        path = folder / name
        if not path.is_file():
            raise ReferenceDataError(f"photo {name} is missing from {folder}")
        with path.open("rb") as photo:
            _write_checked(photo, staging / name, expected, name, folder)


def _extract(archive: Path, staging: Path, reference: Reference) -> None:
    """Stream the tar once, writing only the `<top folder>/images/<file>` members the manifest names."""
    written = set()
    try:
        with tarfile.open(archive, mode="r|*") as tar:
            for member in tar:
                name = member.name.split("/", 1)[-1]
                photo = tar.extractfile(member) if member.isfile() and name in reference.checksums else None
                if photo is not None:
                    _write_checked(photo, staging / name, reference.checksums[name], name, archive)
                    written.add(name)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise ReferenceDataError(f"{archive} is not a complete tar archive ({error})") from error
    missing = sorted(set(reference.checksums) - written)
    if missing:
        more = f" (and {len(missing) - 1:,} more)" if len(missing) > 1 else ""
        raise ReferenceDataError(f"photo {missing[0]} is missing from {archive}{more}")


def _write_checked(stream: IO[bytes], path: Path, expected: str, name: str, source: Path) -> None:
    digest = hashlib.sha256()
    with path.open("wb") as out:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != expected:
        raise ReferenceDataError(f"photo {name} from {source} fails its SHA-256 check (expected {expected}, "
                                 f"found {digest.hexdigest()}): that source is not the pinned upstream copy")


def _download(url: str, target: Path, *, retries: int, progress: bool | None) -> Path:
    """Download `url` beside `target`, resuming a partial download; the complete archive's path.

    The bytes go to `<target>.download.part`, renamed `<target>.download.tar.gz` once complete (a run stopped
    after that extracts it without downloading again)."""
    import httpx

    part = target.with_name(f"{target.name}.download.part")
    complete = target.with_name(f"{target.name}.download.tar.gz")
    if complete.is_file():
        return complete
    timeout = httpx.Timeout(60.0, connect=15.0)
    failures = 0  # in a row, without a byte of progress: a connection that drops now and then still gets there
    with httpx.Client(follow_redirects=True, timeout=timeout) as client:
        while True:
            before = _size(part)
            try:
                _download_once(client, url, part, progress)
                break
            except (httpx.TransportError, _Retryable) as error:
                failures = 0 if _size(part) > before else failures + 1
                if failures > retries:
                    kept = f"; run it again to resume ({_size(part):,} bytes kept)" if _size(part) else ""
                    raise OfflineError(
                        f"cannot download the reference data from {url} ({_reason(error)}, {failures} tries): "
                        f"set COINYEAR_DATA_DIR to a copy (a folder with manifest.csv and images/), or download "
                        f"{url} elsewhere and run `coinyear data fetch --source FILE.tar.gz`{kept}") from error
                time.sleep(0.5 * 2 ** max(failures - 1, 0))
    part.replace(complete)
    return complete


def _download_once(client: httpx.Client, url: str, part: Path, progress: bool | None) -> None:
    """One GET, appending to the part file from where it ends (HTTP Range); raises when the body came short."""
    from tqdm import tqdm

    offset = _size(part)
    # identity: the offsets of a Range are the archive's own bytes, never those of a re-encoded body
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={offset}-"} if offset else {})}
    with client.stream("GET", url, headers=headers) as response:
        if offset and response.status_code == 416:
            if _range_total(response.headers.get("content-range", "")) == offset:
                return  # the part already holds the whole archive
            part.unlink()
            raise _Retryable("the partial download does not fit the server's file")
        if offset and response.status_code == 206:
            if not response.headers.get("content-range", "").startswith(f"bytes {offset}-"):
                part.unlink()
                raise _Retryable("the server answered another range than the one asked for")
            mode = "ab"
        elif response.status_code == 200:
            mode, offset = "wb", 0  # the server ignored the range: start over
        elif response.status_code >= 500:
            raise _Retryable(f"HTTP {response.status_code}")
        else:
            raise ReferenceDataError(f"{url} answered HTTP {response.status_code}: check COINYEAR_DATA_SOURCE "
                                     "or --source")
        length = response.headers.get("content-length")
        total = offset + int(length) if length and length.isdigit() else None
        with part.open(mode) as out, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                          unit_divisor=1024, desc="reference data", file=sys.stderr,
                                          disable=None if progress is None else not progress) as bar:
            for chunk in response.iter_raw():  # unbuffered: what arrived before a drop is kept for the resume
                out.write(chunk)
                bar.update(len(chunk))
    if total is not None and _size(part) != total:
        raise _Retryable(f"the connection closed after {_size(part):,} of {total:,} bytes")


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _range_total(content_range: str) -> int | None:
    """N of a `bytes */N` (or `bytes a-b/N`) Content-Range header."""
    match = re.fullmatch(r"bytes [^/]+/(\d+)", content_range.strip())
    return int(match.group(1)) if match else None


def _reason(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
