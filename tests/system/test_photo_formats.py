"""Photos as people send them, made with Pillow from a real OCRE coin: every format is decoded to the same
pixels as the coin itself (training's preprocessing) and scored by a real `coinyear serve` (200, the same year).

Formats: phone-size JPEG (4000x3000), PNG with alpha, CMYK JPEG, 16-bit grey PNG, WebP, TIFF, BMP, a data URL,
an EXIF-rotated JPEG and HEIC (read with pillow-heif; refused by name where pillow-heif is missing)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from coinyear.data import ImageError, preprocess
from tests.conftest import OCRE
from tests.system.test_serve import Server, copy_home

SIZE = 64  # the trained fixture's image size
FRONT, BACK = "front_image_base64", "back_image_base64"


def coin(name: str = "heads00001.jpg") -> Image.Image:
    with Image.open(OCRE / "images" / name) as image:
        return image.convert("RGB")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def phone_jpeg(image: Image.Image) -> bytes:
    """The coin in the middle of a 4000x3000 phone photo, filling its height, as phones frame a coin."""
    canvas = Image.new("RGB", (4000, 3000), (0, 0, 0))
    big = image.resize((3000 * image.width // image.height, 3000), Image.Resampling.BICUBIC)
    canvas.paste(big, ((4000 - big.width) // 2, 0))
    return encode(canvas, "JPEG", quality=92)


def with_alpha(image: Image.Image) -> bytes:
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.new("L", image.size, 200))
    return encode(rgba, "PNG")


def sixteen_bit_grey(image: Image.Image) -> bytes:
    grey = np.asarray(image.convert("L"), dtype=np.uint16) * 257  # 0..255 -> 0..65535
    return encode(Image.fromarray(grey), "PNG")


def exif_rotated(image: Image.Image) -> bytes:
    """Stored turned a quarter left, with EXIF orientation 6 ("rotate 90 clockwise to show"), as phones do."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())


def heic(image: Image.Image) -> bytes:
    import pillow_heif

    pillow_heif.register_heif_opener()
    return encode(image, "HEIF", quality=95)


# name -> (photo bytes from the coin, compare with the grey coin?, largest mean pixel difference allowed)
FORMATS = {
    "phone jpeg 4000x3000": (phone_jpeg, False, 2.0),
    "png with alpha": (with_alpha, False, 0.5),
    "cmyk jpeg": (lambda image: encode(image.convert("CMYK"), "JPEG", quality=95), False, 2.0),
    "16-bit png": (sixteen_bit_grey, True, 0.5),
    "webp": (lambda image: encode(image, "WEBP", lossless=True), False, 0.5),
    "tiff": (lambda image: encode(image, "TIFF"), False, 0.5),
    "bmp": (lambda image: encode(image, "BMP"), False, 0.5),
    "exif-rotated jpeg": (exif_rotated, False, 2.0),
    "heic": (heic, False, 2.0),
}


def reference(image: Image.Image, grey: bool) -> np.ndarray:
    return preprocess(encode(image.convert("L").convert("RGB") if grey else image, "PNG"), "front", SIZE, False)


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_decodes_to_the_coins_pixels(name):
    make, grey, tolerance = FORMATS[name]
    image = coin()
    decoded = preprocess(make(image), "front", SIZE, False)
    difference = np.abs(decoded.astype(float) - reference(image, grey)).mean()
    assert difference <= tolerance, f"{name}: mean pixel difference {difference:.2f} > {tolerance}"
    # and it is the coin, not any coin-sized picture: another coin differs far more
    other = np.abs(decoded.astype(float) - reference(coin("heads00100.jpg"), grey)).mean()
    assert other > 2 * max(difference, 1.0), (name, other, difference)


def test_heic_without_pillow_heif_is_refused_by_name(monkeypatch):
    import coinyear.data

    monkeypatch.setattr(coinyear.data, "HEIF_SUPPORTED", False)
    with pytest.raises(ImageError, match="HEIC photos are not supported; send JPEG or PNG"):
        coinyear.data.decode_side(heic(coin()), "front")


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    home = copy_home(trained, tmp_path_factory.mktemp("formats") / "home")
    running = Server(home, COINYEAR_MAX_BODY_BYTES=16 * 1024 * 1024).start()
    yield running
    running.kill()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_every_format_scores_like_the_coin_itself(server):
    front, back = coin(), coin("tails00001.jpg")
    back_photo = b64(encode(back, "PNG"))
    expected = {}
    for grey in (False, True):
        reference_front = front.convert("L").convert("RGB") if grey else front
        answer = server.post({"inputs": [{FRONT: b64(encode(reference_front, "PNG")), BACK: back_photo}]})
        assert answer.status_code == 200, answer.text
        expected[grey] = answer.json()["predictions"][0]
    rows = {name: {FRONT: b64(make(front)), BACK: back_photo} for name, (make, _, _) in FORMATS.items()}
    rows["data url"] = {FRONT: "data:image/jpeg;base64," + b64(encode(front, "JPEG", quality=95)),
                        BACK: "data:image/png;base64," + back_photo}
    spread = abs(expected[False] - server.post({"inputs": [{FRONT: b64(encode(coin("heads00100.jpg"), "PNG")),
                                                            BACK: back_photo}]}).json()["predictions"][0])
    for name, row in rows.items():
        response = server.post({"inputs": [row]})
        assert response.status_code == 200, (name, response.text)
        year = response.json()["predictions"][0]
        grey = FORMATS.get(name, (None, False))[1]
        # lossy re-encodings move the year a little; never as far as scoring another coin would
        assert abs(year - expected[grey]) <= max(3.0, spread / 2), (name, year, expected[grey], spread)
