"""Face detection (app/faces.py) and POST /faces on two real photos whose eye centres were marked by hand: one face
each, the eyes where a person sees them, the same answer through the service, at 4x the resolution and from a
sideways file with an EXIF orientation; bad uploads and faceless photos."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from app import faces

from .conftest import encode_image

skimage_data = pytest.importorskip("skimage.data")
matplotlib = pytest.importorskip("matplotlib")

PROBLEM = "application/problem+json"

# Eye centres [[x, y] of the image-left eye, [x, y] of the image-right eye], marked by hand on enlarged crops: the
# middle of each iris (between the eye's corners), in continuous pixel coordinates (pixel i covers [i, i+1)).
MARKED = {
    "astronaut": np.array([[203.0, 100.5], [247.5, 103.5]]),
    "grace_hopper": np.array([[223.0, 189.0], [305.0, 185.5]]),
}
# The usual bar of eye localisation: the worse eye within a tenth of the distance between the eyes (about an iris).
EYE_TOLERANCE = 0.1


def photo(name: str) -> Image.Image:
    if name == "astronaut":
        return Image.fromarray(skimage_data.astronaut())
    with Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")) as img:
        return img.convert("RGB")


def eye_error(eyes: np.ndarray, marked: np.ndarray) -> float:
    """max over both eyes of the distance to the marked centre, over the marked distance between the eyes."""
    return float(np.linalg.norm(np.asarray(eyes) - marked, axis=1).max() / np.linalg.norm(marked[1] - marked[0]))


def post_faces(client, data: bytes, name: str = "photo.png", media_type: str = "image/png"):
    return client.post("/faces", files={"image": (name, data, media_type)})


def eyes_of(answer: dict) -> np.ndarray:
    lm = answer["landmarks"]
    return np.array([np.mean([lm["left_eye_outer"], lm["left_eye_inner"]], axis=0),
                     np.mean([lm["right_eye_inner"], lm["right_eye_outer"]], axis=0)])


def assert_problem(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


# --- app/faces.py ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MARKED))
def test_one_face_with_the_eyes_where_a_person_marked_them(name):
    img = photo(name)
    (face,) = faces.detect(img)
    eyes = face.eyes()
    assert eyes.shape == (2, 2) and eyes.dtype == np.float64
    assert eye_error(eyes, MARKED[name]) <= EYE_TOLERANCE, (eyes.tolist(), MARKED[name].tolist())
    x0, y0, x1, y1 = face.box
    assert x0 < eyes[:, 0].min() and eyes[:, 0].max() < x1 and y0 < eyes[:, 1].min() and eyes[:, 1].max() < y1
    lm = face.landmarks
    assert lm.left_eye_outer[0] < lm.left_eye_inner[0] < lm.nose[0] < lm.right_eye_inner[0] < lm.right_eye_outer[0]
    assert lm.nose[1] > eyes[:, 1].max()  # below the eyes: the image is upright
    assert face.score >= faces.MIN_SCORE


def test_largest_face_first_wherever_it_is():
    small, large = photo("astronaut"), photo("grace_hopper")  # faces of about 90 and 180 px
    canvas = Image.new("RGB", (small.width + large.width, large.height), (128, 128, 128))
    canvas.paste(small, (0, 0))  # the smaller face on the left and higher up
    canvas.paste(large, (small.width, 0))
    found = faces.detect(canvas)
    assert len(found) == 2
    assert found[0].box[0] >= small.width and found[1].box[2] <= small.width
    assert eye_error(found[0].eyes() - [small.width, 0], MARKED["grace_hopper"]) <= EYE_TOLERANCE
    assert eye_error(found[1].eyes(), MARKED["astronaut"]) <= EYE_TOLERANCE
    assert faces.detect(canvas) == found


def test_detection_from_several_threads_at_once_equals_one_at_a_time():
    imgs = [photo(n) for n in sorted(MARKED)] * 2
    alone = [faces.detect(img) for img in imgs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(faces.detect, imgs))
    assert together == alone


def test_weak_detections_are_left_out():
    img = photo("astronaut")
    assert faces.detect(img, min_score=100.0) == []
    assert len(faces.detect(img, min_score=-1.0)) >= len(faces.detect(img))


# --- POST /faces ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MARKED))
def test_faces_endpoint_answers_the_detector(service, name):
    img = photo(name)
    r = post_faces(service, encode_image(img))
    assert r.status_code == 200, r.text[:300]
    body = r.json()
    assert (body["width"], body["height"]) == img.size
    (face,) = body["faces"]
    assert face["index"] == 0
    assert eye_error(eyes_of(face), MARKED[name]) <= EYE_TOLERANCE
    (want,) = faces.detect(img)  # a PNG upload: the same pixels, so the same numbers
    assert face["box"] == list(want.box) and face["score"] == want.score
    assert face["landmarks"] == {k: list(v) for k, v in want.landmarks._asdict().items()}
    metrics = service.get("/metrics").text
    assert 'did_stage_duration_seconds_count{stage="faces"} 1.0' in metrics


def test_a_large_upload_gives_the_same_face_scaled(service):
    img = photo("grace_hopper")
    big = img.resize((img.width * 4, img.height * 4), Image.Resampling.BICUBIC)
    r = post_faces(service, encode_image(big, "JPEG", quality=95), "big.jpg", "image/jpeg")
    assert r.status_code == 200, r.text[:300]
    body = r.json()
    assert (body["width"], body["height"]) == big.size
    (face,) = body["faces"]
    (small,) = post_faces(service, encode_image(img)).json()["faces"]
    # At the original's scale: the same box (the detector sees both at one size) and eyes within 2 px.
    np.testing.assert_allclose(np.array(face["box"]) / 4, small["box"], atol=1.0)
    np.testing.assert_allclose(eyes_of(face) / 4, eyes_of(small), atol=2.0)
    assert eye_error(eyes_of(face) / 4, MARKED["grace_hopper"]) <= EYE_TOLERANCE


def test_a_sideways_file_with_exif_orientation_answers_upright_coordinates(service):
    img = photo("grace_hopper")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90 degrees counter-clockwise: rotate 90 degrees clockwise to display
    tagged = encode_image(img.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif)
    r = post_faces(service, tagged)
    assert r.status_code == 200, r.text[:300]
    body = r.json()
    assert (body["width"], body["height"]) == img.size  # 512 x 600, not the stored 600 x 512
    assert body == post_faces(service, encode_image(img)).json()
    (face,) = body["faces"]
    assert eye_error(eyes_of(face), MARKED["grace_hopper"]) <= EYE_TOLERANCE


def test_a_photo_without_a_face_answers_an_empty_list(service):
    coffee = Image.fromarray(skimage_data.coffee())
    r = post_faces(service, encode_image(coffee, "JPEG", quality=90), "coffee.jpg", "image/jpeg")
    assert r.status_code == 200 and r.json() == {"width": coffee.width, "height": coffee.height, "faces": []}


def test_bad_uploads_are_problems_not_errors(make_service):
    client = make_service(raise_server_exceptions=False, max_upload_bytes=200_000, max_pixels=400_000)
    assert_problem(post_faces(client, b"a line of text, not an image\n", "notes.txt", "text/plain"), 415)
    assert_problem(post_faces(client, b""), 415)
    assert_problem(post_faces(client, encode_image(photo("astronaut"))[:5000]), 415)  # truncated
    assert_problem(post_faces(client, os.urandom(300_000), "noise.png"), 413)  # above the byte cap
    wide = encode_image(Image.new("RGB", (1000, 500)))  # 500 000 pixels in a few kB: above the pixel cap
    assert_problem(post_faces(client, wide), 413)
    assert_problem(client.post("/faces", files={"photo": ("a.png", encode_image(photo("astronaut")), "image/png")}), 422)


def test_faces_needs_the_api_key_when_keys_are_set(make_service):
    client = make_service(api_keys=["k1"])
    png = encode_image(photo("astronaut"))
    assert_problem(post_faces(client, png), 401)
    r = client.post("/faces", files={"image": ("a.png", png, "image/png")}, headers={"X-API-Key": "k1"})
    assert r.status_code == 200 and len(r.json()["faces"]) == 1


def test_openapi_declares_the_answer(service):
    spec = service.get("/openapi.json").json()
    op = spec["paths"]["/faces"]["post"]
    assert "multipart/form-data" in op["requestBody"]["content"]
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("FacesResponse")
    landmarks = spec["components"]["schemas"]["FaceLandmarks"]["properties"]
    assert set(landmarks) == set(faces.Landmarks._fields)
