"""A tiny CelebA-format tree for tests: real attribute names and file layout, random coloured 178x218 JPEGs.

Rows cycle through hand-made archetypes whose pair membership is written out by hand below (not computed with the
code under test), so the returned expectations are an independent statement of the published domain rules.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones "
    "Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young"
).split()
assert len(ATTRIBUTES) == 40

PAIRS = ("smile_glasses", "beard_smile", "beard_glasses")
SPLITS = ("train", "val", "test")

# (attributes the pairs read; domain in smile_glasses, beard_smile, beard_glasses). Unlisted of Goatee, Mustache,
# 5_o_Clock_Shadow are -1; the other attributes are random.
_ARCHETYPES: list[tuple[dict[str, int], tuple[str | None, str | None, str | None]]] = [
    (dict(Smiling=1, Eyeglasses=-1, No_Beard=1, Male=-1), ("a", None, None)),  # smiling woman
    (dict(Smiling=-1, Eyeglasses=1, No_Beard=1, Male=-1), ("b", None, None)),  # woman with glasses
    (dict(Smiling=-1, Eyeglasses=-1, No_Beard=-1, Male=1), (None, "a", "a")),  # bearded man
    (dict(Smiling=1, Eyeglasses=-1, No_Beard=1, Male=1), ("a", "b", None)),  # smiling shaven man
    (dict(Smiling=-1, Eyeglasses=1, No_Beard=1, Male=1), ("b", None, "b")),  # shaven man with glasses
    (dict(Smiling=1, Eyeglasses=-1, No_Beard=1, Goatee=1, Male=1), ("a", None, "a")),  # goatee is a beard
    (dict(Smiling=-1, Eyeglasses=-1, No_Beard=1, Mustache=1, Male=1), (None, "a", "a")),  # moustache is a beard
    (dict(Smiling=-1, Eyeglasses=-1, No_Beard=-1, Male=1, **{"5_o_Clock_Shadow": 1}), (None, None, None)),  # stubble
    (dict(Smiling=-1, Eyeglasses=-1, No_Beard=-1, Male=-1), (None, None, None)),  # beard label on a woman
    (dict(Smiling=1, Eyeglasses=1, No_Beard=1, Male=1), (None, "b", "b")),  # both smile and glasses
    (dict(Smiling=-1, Eyeglasses=-1, No_Beard=1, Male=-1), (None, None, None)),  # neither
]


def _face(rng: np.random.Generator) -> bytes:
    """A 178x218 JPEG of random coloured blocks: distinct per file, quick to write and decode."""
    blocks = rng.integers(0, 256, size=(7, 6, 3), dtype=np.uint8)
    img = Image.fromarray(blocks, "RGB").resize((178, 218), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_celeba(root: Path, n: int = 40, seed: int = 0, with_partition: bool = True, corrupt: int = 1) -> dict:
    """Write `n` images + attribute (+ partition) files under `root`; return what a correct reader must find.

    Rows come in rounds of one row per archetype (shuffled within the round); rounds go to train, val, test,
    train, ..., so n >= 33 puts every archetype in every split. The first `corrupt` files that belong to a
    smile_glasses domain in train are broken: alternately garbage bytes and a JPEG cut in half.

    Returns {"root", "names" (all files), "corrupt" (names), "expected": {pair: {split: (names_a, names_b)}}}
    with splits train/val/test/all; without the partition file, train == all and val/test are empty.
    """
    rng = np.random.default_rng(seed)
    images = Path(root) / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    k = len(_ARCHETYPES)
    names, rows, splits, kinds = [], [], [], []
    for i in range(n):
        if i % k == 0:
            order = rng.permutation(k)
        kind = int(order[i % k])
        name = f"{i + 1:06d}.jpg"
        attrs = {a: int(rng.choice([-1, 1])) for a in ATTRIBUTES}
        attrs.update({"Goatee": -1, "Mustache": -1, "5_o_Clock_Shadow": -1}, **_ARCHETYPES[kind][0])
        (images / name).write_bytes(_face(rng))
        names.append(name)
        rows.append(attrs)
        splits.append(SPLITS[(i // k) % 3] if with_partition else "train")
        kinds.append(kind)

    broken = [nm for nm, kind, sp in zip(names, kinds, splits) if sp == "train" and _ARCHETYPES[kind][1][0]][:corrupt]
    for j, name in enumerate(broken):
        path = images / name
        path.write_bytes(b"this is not a JPEG\n" * 10 if j % 2 == 0 else path.read_bytes()[: path.stat().st_size // 2])

    lines = [str(n), " ".join(ATTRIBUTES)]
    lines += [f"{nm} " + " ".join(f"{row[a]:2d}" for a in ATTRIBUTES) for nm, row in zip(names, rows)]
    (Path(root) / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    if with_partition:
        (Path(root) / "list_eval_partition.txt").write_text(
            "".join(f"{nm} {SPLITS.index(sp)}\n" for nm, sp in zip(names, splits)))

    expected: dict[str, dict[str, tuple[list[str], list[str]]]] = {}
    for p, pair in enumerate(PAIRS):
        def members(domain: str, split: str) -> list[str]:
            return [nm for nm, kind, sp in zip(names, kinds, splits)
                    if _ARCHETYPES[kind][1][p] == domain and split in (sp, "all")]
        expected[pair] = {s: (members("a", s), members("b", s)) for s in (*SPLITS, "all")}
    return {"root": Path(root), "names": names, "corrupt": broken, "expected": expected}
