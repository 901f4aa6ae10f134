"""`coinyear data fetch` (coinyear.reference) against a real HTTP server on 127.0.0.1 serving a small upstream-like
archive made here: photos checked on the way in, a corrupt or missing photo named with nothing left behind, an
interrupted download resumed with a Range request, the offline error of the CLI, local copies preferred over the
network, and the archive's photos outside the manifest never extracted."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from coinyear.config import Settings
from coinyear.reference import UPSTREAM_COMMIT, ReferenceDataError, fetch
from tests.conftest import coin_image

TOP = f"coins_scraping-{UPSTREAM_COMMIT}"


@dataclass
class Small:
    """A three-coin reference set: its manifest and SHA256SUMS, the photos they name, and two upstream photos
    that the manifest leaves out (as the real archive holds ~500 coins more than the shipped manifest)."""

    manifest: Path
    checksums: Path
    photos: dict[str, bytes]
    extra: dict[str, bytes]

    def archive(self, photos: dict[str, bytes] | None = None) -> bytes:
        """The set as upstream's archive lays it out: `<top>/images/...` beside other files, gzipped."""
        files = {"README.md": b"# coins scraping\n", **(self.photos if photos is None else photos), **self.extra}
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for name, data in files.items():
                member = tarfile.TarInfo(f"{TOP}/{name}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
        return buffer.getvalue()

    def copy(self, folder: Path, photos: dict[str, bytes] | None = None) -> Path:
        """A local copy (manifest.csv + images/), as ../shared/data/ocre holds it."""
        (folder / "images").mkdir(parents=True)
        (folder / "manifest.csv").write_bytes(self.manifest.read_bytes())
        for name, data in (self.photos if photos is None else photos).items():
            (folder / name).write_bytes(data)
        return folder

    def fetch(self, tmp_path: Path, **kwargs):
        """`fetch` with this set in place of the shipped one, into HOME/data/ocre unless told otherwise."""
        home = tmp_path / "home"
        return fetch(kwargs.pop("data_dir", home / "data" / "ocre"), home, manifest=self.manifest,
                     checksums=self.checksums, progress=False, **kwargs)


@pytest.fixture
def small(tmp_path, monkeypatch) -> Small:
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")  # a checkout with no ../shared beside it, as on a fresh machine
    monkeypatch.delenv("COINYEAR_DATA_DIR", raising=False)
    folder = tmp_path / "reference"
    folder.mkdir()
    rows, photos = ["coin_id,obverse,reverse,year_from,year_to,date_text"], {}
    for coin in (1, 2, 3):
        for side, seed in (("heads", coin), ("tails", 10 + coin)):
            photos[f"images/{side}{coin:05d}.jpg"] = coin_image(seed)
        rows.append(f"{coin},images/heads{coin:05d}.jpg,images/tails{coin:05d}.jpg,70,79,AD 70 - AD 79")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    (folder / "SHA256SUMS").write_text("".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n"
                                               for name, data in sorted(photos.items())))
    extra = {"images/heads09001.jpg": coin_image(91), "images/tails09001.jpg": coin_image(92)}
    return Small(folder / "manifest.csv", folder / "SHA256SUMS", photos, extra)


class ArchiveServer:
    """A real HTTP server serving one archive with Range support; it can drop its first answer half-way or
    ignore Range (answer 200), and it records every request's Range header (None: no Range)."""

    def __init__(self, data: bytes, drop_first: bool = False, ranges: bool = True, delay: float = 0.0):
        self.data, self.drop_first, self.ranges, self.delay = data, drop_first, ranges, delay
        self.requests: list[str | None] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/archive.tar.gz"

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                asked = self.headers.get("Range")
                server.requests.append(asked)
                time.sleep(server.delay)
                body, status, extra = server.data, 200, {}
                if asked and server.ranges:
                    start, total = int(asked.removeprefix("bytes=").rstrip("-")), len(server.data)
                    if start >= total:
                        status, body, extra = 416, b"", {"Content-Range": f"bytes */{total}"}
                    else:
                        status, body = 206, server.data[start:]
                        extra = {"Content-Range": f"bytes {start}-{total - 1}/{total}"}
                self.send_response(status)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", str(len(body)))
                for key, value in extra.items():
                    self.send_header(key, value)
                self.end_headers()
                if server.drop_first and len(server.requests) == 1:
                    self.wfile.write(body[: len(body) // 2])  # then the connection drops
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        return Handler

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(data: bytes, **options) -> ArchiveServer:
        servers.append(ArchiveServer(data, **options))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def leftovers(folder: Path) -> list[str]:
    """What a fetch left in the destination's parent, but for its lock file."""
    return sorted(path.name for path in folder.iterdir() if not path.name.endswith(".lock"))


def installed(dest: Path) -> dict[str, bytes]:
    return {f"images/{path.name}": path.read_bytes() for path in (dest / "images").iterdir()}


def test_a_download_is_checked_installed_whole_and_only_the_manifest_photos(small, serve, tmp_path):
    server = serve(small.archive())
    done = small.fetch(tmp_path, fallback_source=server.url)
    dest = tmp_path / "home" / "data" / "ocre"
    assert done.fetched and done.path == dest and server.requests == [None]
    assert installed(dest) == small.photos  # the upstream photos outside the manifest are not extracted
    assert (dest / "manifest.csv").read_bytes() == small.manifest.read_bytes()
    assert (dest / "SHA256SUMS").read_bytes() == small.checksums.read_bytes()
    assert leftovers(dest.parent) == ["ocre"]  # no archive, part or staging folder left

    again = small.fetch(tmp_path, fallback_source=server.url)
    assert not again.fetched and "already at" in again.message and server.requests == [None]


@pytest.mark.parametrize("fault", ["corrupt", "missing"])
def test_a_bad_photo_is_named_and_leaves_nothing(small, serve, tmp_path, fault):
    name = "images/tails00002.jpg"
    photos = dict(small.photos)
    if fault == "corrupt":
        photos[name] = photos[name][:-10] + b"0123456789"
    else:
        del photos[name]
    server = serve(small.archive(photos))
    with pytest.raises(ReferenceDataError, match=name):
        small.fetch(tmp_path, fallback_source=server.url)
    assert leftovers(tmp_path / "home" / "data") == []  # no dest, no staging folder, no bad archive


@pytest.mark.parametrize("ranges", [True, False], ids=["resumed", "server-without-ranges"])
def test_an_interrupted_download_is_resumed(small, serve, tmp_path, ranges):
    data = small.archive()
    server = serve(data, drop_first=True, ranges=ranges)
    done = small.fetch(tmp_path, fallback_source=server.url)
    assert done.fetched and installed(done.path) == small.photos
    first, second = server.requests
    assert first is None and second == f"bytes={len(data) // 2}-"  # it asked for the rest, from where it broke


def test_two_fetches_at_once_download_once(small, serve, tmp_path):
    server = serve(small.archive(), delay=0.5)  # the second starts while the first is still downloading
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda _: small.fetch(tmp_path, fallback_source=server.url), range(2)))
    assert sorted(d.fetched for d in done) == [False, True] and server.requests == [None]
    assert installed(done[0].path) == small.photos


def test_offline_is_one_line_and_exit_code_2(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: connections are refused
    env = {k: v for k, v in os.environ.items() if k != "COINYEAR_DATA_DIR"}
    env.update(COINYEAR_HOME=str(tmp_path / "home"), COINYEAR_DATA_SOURCE=f"http://127.0.0.1:{port}/a.tar.gz")
    done = subprocess.run([sys.executable, "-m", "coinyear.cli", "data", "fetch"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "COINYEAR_DATA_DIR" in lines[0] and "coinyear data fetch --source FILE.tar.gz" in lines[0]
    assert f"127.0.0.1:{port}" in lines[0]
    assert not (tmp_path / "home" / "data" / "ocre").exists()


def test_a_shared_copy_is_used_in_place_without_the_network(small, serve, tmp_path):
    shared = small.copy(tmp_path / "shared" / "data" / "ocre")  # ../shared/data/ocre seen from the repository
    server = serve(small.archive())
    settings = Settings(home=tmp_path / "home")
    assert settings.data_dir == shared
    done = small.fetch(tmp_path, data_dir=settings.data_dir, fallback_source=server.url)
    assert not done.fetched and done.path == shared and str(shared) in done.message
    # with another destination, the photos are copied from the local copy, still without the network
    copied = small.fetch(tmp_path, data_dir=settings.data_dir, dest=tmp_path / "elsewhere",
                         fallback_source=server.url)
    assert copied.fetched and installed(copied.path) == small.photos
    assert server.requests == []


def test_coinyear_data_dir_comes_first_and_is_checked(small, serve, tmp_path, monkeypatch):
    small.copy(tmp_path / "shared" / "data" / "ocre")
    mine = small.copy(tmp_path / "mine")
    monkeypatch.setenv("COINYEAR_DATA_DIR", str(mine))
    server = serve(small.archive())
    settings = Settings(home=tmp_path / "home")
    assert settings.data_dir == mine
    assert small.fetch(tmp_path, data_dir=settings.data_dir, fallback_source=server.url).path == mine
    assert server.requests == []
    (mine / "images" / "heads00003.jpg").write_bytes(b"changed")
    with pytest.raises(ReferenceDataError, match=r"images/heads00003\.jpg"):
        small.fetch(tmp_path, data_dir=settings.data_dir, fallback_source=server.url)


def test_without_a_copy_settings_point_at_the_fetch_destination(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COINYEAR_DATA_DIR", raising=False)
    assert Settings(home=tmp_path / "home").data_dir == tmp_path / "home" / "data" / "ocre"


@pytest.mark.parametrize("kind", ["archive", "folder"])
def test_a_local_archive_or_folder_is_a_source(small, tmp_path, kind):
    if kind == "archive":
        source = tmp_path / "upstream.tar.gz"
        source.write_bytes(small.archive())
    else:
        source = small.copy(tmp_path / "upstream")
        for name, data in small.extra.items():
            (source / name).write_bytes(data)
    done = small.fetch(tmp_path, source=str(source))
    assert done.fetched and installed(done.path) == small.photos
    assert source.exists()  # the user's own archive or folder is left as it was
