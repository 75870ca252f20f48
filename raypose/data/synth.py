"""A synthetic Human3.6M look-alike: `raypose data synth` and `raypose data samples`.

Each sample is a 17-joint body (Human3.6M joint order and bone lengths, varied per subject) in one of
six parametric actions at a random phase, turned by a random yaw about the vertical, placed 3.5 to
6.5 m in front of one of the four Human3.6M cameras (PAPER.md intrinsics; camera x right, y down,
z forward), and rendered straight into the 128 x 128 crop of a square box around its 2D joints.

The body is drawn as capsules (limbs, torso, pelvis, shoulders, neck, feet) and spheres (head, nose,
hands) with a per-pixel depth buffer, so nearer parts cover farther ones; radii shrink with
distance; shading falls with the surface's slant (a tube looks round) and with depth relative to the
pelvis (nearer is brighter), which carries the depth cues a CNN needs. Each subject has two limb
colours, one warm (red to orange) and one cool (cyan to blue), legs darker than arms, the torso
another hue with a pale panel on the shirt's front, a skin-toned face with a dark nose and hair on
the back and top of the head, so front and back look different. The background is a random
texture (stripes or checks, blotches, noise) in random colours.

Side colours (`--side-colours`):
- `fixed` (default): the left limbs wear the warm colour, as a subject's clothes would in every
  frame. A left/right mirror of such a sample shows a labelled left side in cool colours, which
  never occurs at test, so the files say `mirror_consistent = false` and training runs without the
  flip augmentation. Measured on 2,000 samples (plain loop, batch 16, Adam 3e-4): 0.92x, 0.80x
  and 0.75x the mean-pose baseline on validation after epochs 1-3, against 1.01x, 0.98x and 0.98x
  for `per-sample` with flip.
- `per-sample`: which side wears the warm colour is drawn per sample (`sides_swapped`,
  probability 1/2), so colour says which limbs belong together but not which side is left: left
  and right are told apart by the face and the depth order, as in real images. A mirrored sample
  then looks like an unmirrored sample of the mirrored pose (`mirror_consistent = true`), and flip
  augmentation is honest; the task is harder and learns more slowly.

Subjects: the train split uses S1 S5 S6 S7 S8, the test split S9 S11 (each subject its own body
proportions, limb widths and colours), and the two splits draw from different random streams.
Rendering is vectorised with numpy: a loop over the ~19 body primitives, each evaluated at once for
all images of a batch over the pixels of its own bounding box (the largest box in the batch), into
a shared depth buffer.
"""

import argparse
import time
from pathlib import Path

import numpy as np

from raypose.data.cache import write_manifest
from raypose.data.schema import SplitWriter, validate_file
from raypose.data.skeleton import H36M_SKELETON
from raypose.validate import (
    InputError,
    existing_file,
    output_dir,
    output_file,
    refuse_existing,
    replace_atomically,
)

IMAGE_SIZE = 128
TRAIN_SUBJECTS = ("S1", "S5", "S6", "S7", "S8")
TEST_SUBJECTS = ("S9", "S11")
ACTIONS = ("walk", "sit", "wave", "bend", "reach", "squat")
RENDER_BATCH = 16  # images per vectorised render call (memory ~ RENDER_BATCH * 20 * 128^2 floats)

# The four Human3.6M cameras: id -> (focal (fx, fy), principal point (cx, cy)), pixels (PAPER.md).
CAMERAS = {
    "54138969": ((1145.05, 1143.78), (512.54, 515.45)),
    "55011271": ((1149.68, 1147.59), (508.85, 508.06)),
    "58860488": ((1149.14, 1148.80), (519.82, 501.40)),
    "60457274": ((1145.51, 1144.77), (514.97, 501.88)),
}

# Human3.6M-like bone lengths, mm (mean adult of the Human3.6M training subjects).
BONE_MM = {
    "hip": 133.0,
    "thigh": 446.0,
    "shin": 452.0,
    "spine": 233.0,
    "thorax": 257.0,
    "neck": 121.0,
    "head": 115.0,
    "shoulder": 151.0,
    "upper_arm": 279.0,
    "forearm": 250.0,
}
RADIUS_MM = {
    "thigh": 72.0,
    "shin": 52.0,
    "foot": 38.0,
    "pelvis": 95.0,
    "belly": 115.0,
    "chest": 125.0,
    "shoulders": 62.0,
    "neck": 45.0,
    "head": 98.0,
    "nose": 26.0,
    "upper_arm": 46.0,
    "forearm": 37.0,
    "hand": 44.0,
}

# Colour slots of a body; primitives index into them.
TORSO, SKIN, LEFT_ARM, RIGHT_ARM, LEFT_LEG, RIGHT_LEG, SHOES, NOSE, HAIR, SHIRT_FRONT = range(10)
# the slot each slot takes when a sample's sides are swapped (warm limbs on the right)
SWAPPED_SLOTS = np.array(
    [TORSO, SKIN, RIGHT_ARM, LEFT_ARM, RIGHT_LEG, LEFT_LEG, SHOES, NOSE, HAIR, SHIRT_FRONT]
)


# ----------------------------------------------------------------------------------------------
# small geometry helpers (all batched over a leading axis)


def _rot(axis: str, angle: np.ndarray) -> np.ndarray:
    """Rotation matrices (B, 3, 3) about a coordinate axis by angle (B,) radians (right-handed)."""
    angle = np.asarray(angle, dtype=np.float64)
    c, s = np.cos(angle), np.sin(angle)
    o, z = np.ones_like(angle), np.zeros_like(angle)
    if axis == "x":
        m = [[o, z, z], [z, c, -s], [z, s, c]]
    elif axis == "y":
        m = [[c, z, s], [z, o, z], [-s, z, c]]
    else:
        m = [[c, -s, z], [s, c, z], [z, z, o]]
    return np.stack([np.stack(row, axis=-1) for row in m], axis=-2)


def _apply(rotation: np.ndarray, vector) -> np.ndarray:
    """(B, 3, 3) @ (3,) or (B, 3) -> (B, 3)."""
    vector = np.asarray(vector, dtype=np.float64)
    if vector.ndim == 1:
        return rotation @ vector
    return np.einsum("bij,bj->bi", rotation, vector)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _hsv(h, s, v) -> np.ndarray:
    """HSV (h in degrees) -> RGB in [0, 1]."""
    h = (h % 360.0) / 60.0
    c = v * s
    x = c * (1 - abs(h % 2 - 1))
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    return np.array(rgb) + (v - c)


# ----------------------------------------------------------------------------------------------
# bodies


def make_body(subject: str, seed: int) -> dict:
    """One subject's body: bone lengths and radii (mm) and the 8 colour slots, from (seed, subject)."""
    rng = np.random.default_rng([int(seed), 7919, int(subject.lstrip("S") or 0)])
    scale = rng.uniform(0.9, 1.1)  # overall size
    bones = {k: v * scale * rng.uniform(0.94, 1.06) for k, v in BONE_MM.items()}
    girth = rng.uniform(0.85, 1.2)  # slim to heavy
    radii = {k: v * scale * girth * rng.uniform(0.92, 1.08) for k, v in RADIUS_MM.items()}
    radii["head"] = RADIUS_MM["head"] * scale * rng.uniform(0.93, 1.07)
    colours = np.zeros((10, 3))
    torso_hue = rng.choice([rng.uniform(60, 160), rng.uniform(260, 330)])
    colours[TORSO] = _hsv(torso_hue, rng.uniform(0.3, 0.8), rng.uniform(0.55, 0.9))
    # the shirt's front panel: the torso's hue, pale; the back has none
    colours[SHIRT_FRONT] = _hsv(torso_hue, rng.uniform(0.05, 0.2), rng.uniform(0.9, 1.0))
    colours[HAIR] = _hsv(rng.uniform(20, 40), rng.uniform(0.3, 0.7), rng.uniform(0.08, 0.35))
    skin = np.array(
        [(0.96, 0.80, 0.69), (0.87, 0.67, 0.52), (0.72, 0.52, 0.36), (0.50, 0.34, 0.22)]
    )
    colours[SKIN] = np.clip(skin[rng.integers(len(skin))] * rng.uniform(0.92, 1.05, 3), 0, 1)
    warm, cool = rng.uniform(0, 35), rng.uniform(190, 235)
    colours[LEFT_ARM] = _hsv(warm, rng.uniform(0.7, 0.95), rng.uniform(0.85, 1.0))
    colours[RIGHT_ARM] = _hsv(cool, rng.uniform(0.7, 0.95), rng.uniform(0.85, 1.0))
    colours[LEFT_LEG] = _hsv(
        warm + rng.uniform(-8, 8), rng.uniform(0.7, 0.95), rng.uniform(0.5, 0.65)
    )
    colours[RIGHT_LEG] = _hsv(
        cool + rng.uniform(-8, 8), rng.uniform(0.7, 0.95), rng.uniform(0.5, 0.65)
    )
    colours[SHOES] = np.full(3, rng.uniform(0.12, 0.3))
    colours[NOSE] = np.array([0.1, 0.07, 0.06])
    return {
        "subject": subject,
        "bones": bones,
        "radii": radii,
        "colours": colours.astype(np.float32),
    }


# ----------------------------------------------------------------------------------------------
# actions: joint angles (radians) as functions of the phase, per sample

SIDES = ("l", "r")
ANGLE_KEYS = ("bend", "lean", "twist", "head_pitch", "head_yaw") + tuple(
    f"{name}_{s}"
    for s in SIDES
    for name in ("hip_flex", "hip_abd", "knee", "sh_flex", "sh_abd", "sh_twist", "elbow")
)


def _standing(b: int) -> dict:
    a = {k: np.zeros(b) for k in ANGLE_KEYS}
    for s in SIDES:
        a[f"hip_abd_{s}"] += 0.06
        a[f"knee_{s}"] += 0.05
        a[f"sh_abd_{s}"] += 0.12
        a[f"elbow_{s}"] += 0.2
    return a


def _mirror(a: dict, which: np.ndarray) -> dict:
    """Swap left and right angles where `which` (the mirrored pose of an asymmetric action)."""
    out = dict(a)
    for key in ANGLE_KEYS:
        if key.endswith("_l"):
            r = key[:-2] + "_r"
            out[key] = np.where(which, a[r], a[key])
            out[r] = np.where(which, a[key], a[r])
    out["twist"] = np.where(which, -a["twist"], a["twist"])
    out["lean"] = np.where(which, -a["lean"], a["lean"])
    out["head_yaw"] = np.where(which, -a["head_yaw"], a["head_yaw"])
    return out


def action_angles(action: str, phase: np.ndarray, rng: np.random.Generator) -> dict:
    """Angles for one action at phases in [0, 1) (B,), with per-sample amplitude and noise."""
    b = len(phase)
    p = 2 * np.pi * phase
    amp = rng.uniform(0.7, 1.2, b)
    a = _standing(b)
    if action == "walk":
        a["hip_flex_l"], a["hip_flex_r"] = 0.45 * amp * np.sin(p), -0.45 * amp * np.sin(p)
        a["knee_l"] = 0.1 + 0.75 * amp * np.clip(np.sin(p + 1.2), 0, None)
        a["knee_r"] = 0.1 + 0.75 * amp * np.clip(np.sin(p + 1.2 + np.pi), 0, None)
        a["sh_flex_l"], a["sh_flex_r"] = -0.4 * amp * np.sin(p), 0.4 * amp * np.sin(p)
        a["elbow_l"] = 0.3 + 0.3 * amp * np.clip(-np.sin(p), 0, None)
        a["elbow_r"] = 0.3 + 0.3 * amp * np.clip(np.sin(p), 0, None)
        a["bend"] += 0.06
        a["twist"] = -0.12 * amp * np.sin(p)
    elif action == "sit":
        for s in SIDES:
            a[f"hip_flex_{s}"] = 1.45 + rng.normal(0, 0.1, b)
            a[f"knee_{s}"] = 1.5 + rng.normal(0, 0.15, b)
            a[f"hip_abd_{s}"] = rng.uniform(0.05, 0.3, b)
            a[f"sh_flex_{s}"] = 0.5 + rng.normal(0, 0.1, b)
            a[f"elbow_{s}"] = 0.9 + rng.normal(0, 0.1, b)
        a["bend"] = 0.1 + 0.2 * amp * np.sin(p)
        a["sh_flex_r"] = a["sh_flex_r"] + 0.7 * amp * (1 + np.sin(p)) / 2  # a gesturing arm
        a["head_pitch"] = 0.1 + 0.1 * np.sin(p)
        a = _mirror(a, rng.random(b) < 0.5)
    elif action == "wave":
        a["sh_abd_l"] = 1.45 + rng.normal(0, 0.15, b)
        a["sh_flex_l"] = 0.3 + rng.normal(0, 0.15, b)
        a["sh_twist_l"] = 1.4
        a["elbow_l"] = 0.9 + 0.5 * amp * np.sin(p)
        a["head_yaw"] = 0.3 * amp
        a["lean"] = -0.05 * amp
        a = _mirror(a, rng.random(b) < 0.5)
    elif action == "bend":
        depth = (1 - np.cos(p)) / 2
        a["bend"] = 0.2 + 1.05 * amp * depth
        a["head_pitch"] = -0.3 * depth
        for s in SIDES:
            a[f"sh_flex_{s}"] = a["bend"] + 0.15 + rng.normal(0, 0.1, b)  # arms hang down
            a[f"knee_{s}"] = 0.1 + 0.3 * depth
            a[f"hip_flex_{s}"] = 0.1 * depth
    elif action == "reach":
        a["sh_flex_l"] = 1.1 + 1.3 * (1 + np.sin(p)) / 2 * amp
        a["sh_abd_l"] = rng.uniform(0.0, 0.5, b)
        a["elbow_l"] = rng.uniform(0.0, 0.3, b)
        a["sh_flex_r"], a["elbow_r"] = 0.2 + rng.normal(0, 0.1, b), 0.5
        a["twist"] = -0.3 * amp
        a["bend"] = 0.15 * amp
        a["hip_flex_l"], a["knee_l"] = 0.35 * amp, 0.25 * amp
        a["hip_flex_r"] = -0.1 * amp
        a = _mirror(a, rng.random(b) < 0.5)
    elif action == "squat":
        depth = (1 - np.cos(p)) / 2 * np.clip(amp, 0, 1)
        for s in SIDES:
            a[f"hip_flex_{s}"] = 0.1 + 1.8 * depth
            a[f"knee_{s}"] = 0.1 + 2.1 * depth
            a[f"hip_abd_{s}"] = 0.1 + 0.2 * depth
            a[f"sh_flex_{s}"] = 0.3 + 1.2 * depth
        a["bend"] = 0.1 + 0.6 * depth
    else:
        raise ValueError(f"unknown action {action!r}; expected one of {ACTIONS}")
    noise = {"bend": 0.06, "lean": 0.04, "twist": 0.08, "head_pitch": 0.1, "head_yaw": 0.2}
    for key in ANGLE_KEYS:
        a[key] = np.broadcast_to(a[key], (b,)) + rng.normal(0, noise.get(key, 0.08), b)
    for s in SIDES:  # knees and elbows do not bend backwards
        a[f"knee_{s}"] = np.abs(a[f"knee_{s}"])
        a[f"elbow_{s}"] = np.abs(a[f"elbow_{s}"])
    return a


def forward_kinematics(body: dict, a: dict):
    """Joint positions and drawing primitives in the body frame (mm; x to the subject's left,
    y up, z forward; pelvis at the origin).

    Returns joints (B, 17, 3), primitive endpoints (B, P, 2, 3), radii (P,) mm and colour slots (P,).
    """
    L, R = body["bones"], body["radii"]
    b = len(a["bend"])
    down = np.array([0.0, -1.0, 0.0])
    up = np.array([0.0, 1.0, 0.0])
    torso = _rot("y", a["twist"]) @ _rot("x", a["bend"]) @ _rot("z", a["lean"])
    head = torso @ _rot("y", a["head_yaw"]) @ _rot("x", a["head_pitch"])
    j = np.zeros((b, 17, 3))
    j[:, 7] = _apply(torso, up * L["spine"])
    chest = torso @ _rot("x", np.full(b, 0.08))
    j[:, 8] = j[:, 7] + _apply(chest, up * L["thorax"])
    j[:, 9] = j[:, 8] + _apply(head, _unit([0, 0.9, 0.45]) * L["neck"])
    j[:, 10] = j[:, 9] + _apply(head, _unit([0, 1.0, -0.25]) * L["head"])
    hands, feet = [], []
    for side, sign, (hip, knee, foot), (shoulder, elbow, wrist) in (
        ("l", 1.0, (4, 5, 6), (11, 12, 13)),
        ("r", -1.0, (1, 2, 3), (14, 15, 16)),
    ):
        j[:, hip] = sign * np.array([L["hip"], 0, 0])
        leg = _rot("z", sign * a[f"hip_abd_{side}"]) @ _rot("x", -a[f"hip_flex_{side}"])
        shin = leg @ _rot("x", a[f"knee_{side}"])
        j[:, knee] = j[:, hip] + _apply(leg, down * L["thigh"])
        j[:, foot] = j[:, knee] + _apply(shin, down * L["shin"])
        feet.append(
            (j[:, foot], j[:, foot] + _apply(shin, _unit([0, -0.25, 1]) * 0.3 * L["thigh"]))
        )
        j[:, shoulder] = j[:, 8] + _apply(chest, _unit([sign, -0.22, -0.08]) * L["shoulder"])
        arm = (
            torso
            @ _rot("z", sign * a[f"sh_abd_{side}"])
            @ _rot("x", -a[f"sh_flex_{side}"])
            @ _rot("y", sign * a[f"sh_twist_{side}"])
        )
        forearm = arm @ _rot("x", -a[f"elbow_{side}"])
        j[:, elbow] = j[:, shoulder] + _apply(arm, down * L["upper_arm"])
        j[:, wrist] = j[:, elbow] + _apply(forearm, down * L["forearm"])
        hands.append(j[:, wrist] + _apply(forearm, down * 0.3 * R["hand"]))
    head_centre = 0.5 * (j[:, 9] + j[:, 10]) + _apply(head, [0, 0, -0.35 * R["head"]])
    nose = head_centre + _apply(head, _unit([0, -0.15, 1]) * 0.95 * R["head"])
    # front and back look different, as on a person: hair covers the back and top of the head
    # (a sphere set back from the head's, so the face shows in front), and the shirt has a pale
    # front panel (a capsule set forward in the chest, hidden inside it from behind)
    hair = head_centre + _apply(head, [0, 0.12 * R["head"], -0.22 * R["head"]])
    panel_forward = _apply(chest, [0, 0, 0.45 * R["chest"]])
    panel = (
        0.5 * (j[:, 0] + j[:, 7]) + panel_forward,
        j[:, 8] + panel_forward + _apply(chest, down * 0.45 * R["chest"]),
    )
    P = [  # (start, end, radius, colour slot)
        (j[:, 1], j[:, 2], R["thigh"], RIGHT_LEG),
        (j[:, 2], j[:, 3], R["shin"], RIGHT_LEG),
        (j[:, 4], j[:, 5], R["thigh"], LEFT_LEG),
        (j[:, 5], j[:, 6], R["shin"], LEFT_LEG),
        (*feet[1], R["foot"], SHOES),
        (*feet[0], R["foot"], SHOES),
        (j[:, 1], j[:, 4], R["pelvis"], TORSO),
        (j[:, 0], j[:, 7], R["belly"], TORSO),
        (j[:, 7], j[:, 8] + _apply(chest, down * 0.3 * R["chest"]), R["chest"], TORSO),
        (j[:, 11], j[:, 14], R["shoulders"], TORSO),
        (j[:, 8], j[:, 9], R["neck"], SKIN),
        (head_centre, head_centre, R["head"], SKIN),
        (nose, nose, R["nose"], NOSE),
        (hair, hair, 0.97 * R["head"], HAIR),
        (*panel, 0.6 * R["chest"], SHIRT_FRONT),
        (j[:, 11], j[:, 12], R["upper_arm"], LEFT_ARM),
        (j[:, 12], j[:, 13], R["forearm"], LEFT_ARM),
        (j[:, 14], j[:, 15], R["upper_arm"], RIGHT_ARM),
        (j[:, 15], j[:, 16], R["forearm"], RIGHT_ARM),
        (hands[0], hands[0], R["hand"], SKIN),
        (hands[1], hands[1], R["hand"], SKIN),
    ]
    ends = np.stack(
        [
            np.stack([np.broadcast_to(s, (b, 3)), np.broadcast_to(e, (b, 3))], axis=1)
            for s, e, _, _ in P
        ],
        axis=1,
    )  # (B, P, 2, 3)
    radii = np.array([r for _, _, r, _ in P])
    slots = np.array([c for _, _, _, c in P])
    return j, ends, radii, slots


# ----------------------------------------------------------------------------------------------
# rendering


def render_capsules(
    starts,
    ends,
    radii,
    colours,
    focal,
    principal,
    crop,
    size: int = IMAGE_SIZE,
    background=None,
    depth_ref=None,
):
    """Draws capsules with a depth buffer straight into square crops of the camera image.

    starts, ends: (B, P, 3) capsule axis end points, camera coordinates in mm (z forward);
        a sphere is a capsule with equal ends.
    radii: (B, P) or (P,) mm.   colours: (B, P, 3) RGB in [0, 1].
    focal, principal: (B, 2) pinhole intrinsics in image pixels.
    crop: (B, 3) (x0, y0, side) of the square box in image pixels; crop pixel (i, j) has its centre
        at image point (x0 + (j + 0.5) * side / size, y0 + (i + 0.5) * side / size).
    background: (B, size, size, 3) in [0, 1] (default black).
    depth_ref: (B,) or a scalar, mm: the depth shown at neutral brightness (default: the mean
        depth of the capsules).

    The capsule is projected: its axis and its radius (f * r / z, so it shrinks with distance) are
    interpolated along the projected axis; a pixel within that radius hits it at depth
    z(t) - r * sqrt(1 - (d / radius)^2) (the tube's front surface). The nearest hit wins. Shading:
    (0.35 + 0.65 * sqrt(1 - (d / radius)^2)) for the tube's roundness, times
    clip(1 - 0.45 * (z - depth_ref) / 1000 mm, 0.45, 1.5) so that nearer is brighter.
    Returns (images (B, size, size, 3) float32 in [0, 1], part (B, size, size) int64 index of the
    winning capsule or -1, depth (B, size, size) float32 mm, inf on background).
    Each capsule is evaluated for the whole batch at once, over the pixels of its bounding box
    only (one window size per capsule: the largest box in the batch).
    """
    starts = np.asarray(starts, dtype=np.float32)
    ends = np.asarray(ends, dtype=np.float32)
    b, p, _ = starts.shape
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float32), (b, p))
    colours = np.broadcast_to(np.asarray(colours, dtype=np.float32), (b, p, 3))
    focal = np.asarray(focal, dtype=np.float32)
    principal = np.asarray(principal, dtype=np.float32)
    crop = np.asarray(crop, dtype=np.float32)
    to_crop = size / crop[:, 2]  # (B,) crop pixels per image pixel

    def project(x):  # (B, P, 3) -> crop pixels (B, P, 2), depth (B, P)
        z = np.maximum(x[..., 2], 1.0)
        uv = focal[:, None] * x[..., :2] / z[..., None] + principal[:, None]
        return (uv - crop[:, None, :2]) * to_crop[:, None, None], z

    a2, za = project(starts)
    b2, zb = project(ends)
    ra = radii * focal[:, None, 0] * to_crop[:, None] / za  # (B, P) crop pixels
    rb = radii * focal[:, None, 0] * to_crop[:, None] / zb
    ab = b2 - a2
    inv_len2 = 1.0 / np.maximum((ab**2).sum(-1), 1e-6)  # (B, P)
    # each capsule's pixel box, clipped to the crop
    rmax = np.maximum(ra, rb)
    box_lo = np.clip(np.floor(np.minimum(a2, b2) - rmax[..., None]), 0, size).astype(
        np.int64
    )  # (B, P, 2)
    box_hi = np.clip(np.ceil(np.maximum(a2, b2) + rmax[..., None]) + 1, 0, size).astype(np.int64)

    zbuf = np.full((b, size, size), np.inf, dtype=np.float32)
    part = np.full((b, size, size), -1, dtype=np.int64)
    roundness = np.zeros((b, size, size), dtype=np.float32)
    zbuf_flat, part_flat, round_flat = zbuf.reshape(-1), part.reshape(-1), roundness.reshape(-1)
    batch = np.arange(b)[:, None, None]
    for k in range(p):
        # one window size for the whole batch: the largest box of capsule k
        w = int((box_hi[:, k, 0] - box_lo[:, k, 0]).max())
        h = int((box_hi[:, k, 1] - box_lo[:, k, 1]).max())
        if w <= 0 or h <= 0:
            continue
        x0 = np.minimum(box_lo[:, k, 0], size - w)  # (B,)
        y0 = np.minimum(box_lo[:, k, 1], size - h)
        cols = x0[:, None] + np.arange(w)  # (B, w) pixel columns
        rows = y0[:, None] + np.arange(h)  # (B, h)
        ux = (cols + 0.5 - a2[:, k, 0:1]).astype(np.float32)[:, None, :]  # (B, 1, w)
        uy = (rows + 0.5 - a2[:, k, 1:2]).astype(np.float32)[:, :, None]  # (B, h, 1)
        abx, aby = ab[:, k, 0, None, None], ab[:, k, 1, None, None]
        t = np.clip((ux * abx + uy * aby) * inv_len2[:, k, None, None], 0.0, 1.0)  # (B, h, w)
        dx = ux - t * abx
        dy = uy - t * aby
        rad = ra[:, k, None, None] + t * (rb - ra)[:, k, None, None]
        cover = 1.0 - (dx * dx + dy * dy) / (rad * rad)  # > 0 inside the capsule
        bulge = np.sqrt(np.maximum(cover, 0.0))  # 1 on the axis, 0 at the rim
        depth = (
            za[:, k, None, None] + t * (zb - za)[:, k, None, None] - bulge * radii[:, k, None, None]
        )
        flat = (batch * size + rows[:, :, None]) * size + cols[:, None, :]  # (B, h, w) pixel ids
        nearer = (cover > 0) & (depth < zbuf_flat[flat])
        flat = flat[nearer]
        zbuf_flat[flat] = depth[nearer]
        part_flat[flat] = k
        round_flat[flat] = bulge[nearer]

    inside = part >= 0
    if depth_ref is None:
        depth_ref = 0.5 * (za + zb).mean(axis=1)
    depth_ref = np.broadcast_to(np.asarray(depth_ref, dtype=np.float32), (b,))[:, None, None]
    near = np.clip(1.0 - 0.45 * (np.where(inside, zbuf, depth_ref) - depth_ref) / 1000.0, 0.45, 1.5)
    shade = (0.35 + 0.65 * roundness) * near  # (B, size, size)
    colour = colours[batch, np.maximum(part, 0)]  # (B, size, size, 3)
    if background is None:
        background = np.zeros((b, size, size, 3), dtype=np.float32)
    image = np.where(inside[..., None], colour * shade[..., None], background)
    return np.clip(image, 0, 1).astype(np.float32), part, zbuf


def textured_background(rng: np.random.Generator, b: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """(B, size, size, 3) in [0, 1]: stripes or checks between two random colours, soft blotches,
    a vertical brightness gradient and pixel noise."""
    f32 = np.float32
    c1 = rng.uniform(0.05, 0.95, (b, 1, 1, 3)).astype(f32)
    c2 = rng.uniform(0.05, 0.95, (b, 1, 1, 3)).astype(f32)
    y, x = np.mgrid[0:size, 0:size].astype(f32) + f32(0.5)  # (size, size) pixel centres
    theta = rng.uniform(0, np.pi, (b, 1, 1)).astype(f32)
    period = rng.uniform(6, 40, (b, 1, 1)).astype(f32)
    phase = rng.uniform(0, 2 * np.pi, (b, 1, 1)).astype(f32)
    u = (x * np.cos(theta) + y * np.sin(theta)) * (2 * np.pi / period) + phase  # (B, size, size)
    v = (y * np.cos(theta) - x * np.sin(theta)) * (2 * np.pi / period)
    stripes = 0.5 + 0.5 * np.sin(u)
    checks = (np.sin(u) * np.sin(v) > 0).astype(f32)
    pattern = np.where(rng.random((b, 1, 1)) < 0.5, stripes, checks)
    contrast = rng.uniform(0.2, 1.0, (b, 1, 1, 1)).astype(f32)
    image = c1 + (c2 - c1) * (pattern[..., None] * contrast)  # (B, size, size, 3)
    # blotches: a random 5 x 5 grid of colours, upsampled bilinearly
    coarse = rng.standard_normal((b, 5, 5, 3), dtype=f32)
    pos = np.linspace(0, 4, size, dtype=f32)
    i0 = np.minimum(pos.astype(np.int64), 3)
    w = (pos - i0).astype(f32)[:, None, None]  # (size, 1, 1) weight along one axis
    rows = coarse[:, i0] * (1 - w) + coarse[:, i0 + 1] * w  # (B, size, 5, 3)
    blotch = rows[:, :, i0] * (1 - w[:, 0]) + rows[:, :, i0 + 1] * w[:, 0]  # (B, size, size, 3)
    image += blotch * rng.uniform(0.02, 0.12, (b, 1, 1, 1)).astype(f32)
    image *= 1 + rng.uniform(-0.25, 0.25, (b, 1, 1, 1)).astype(f32) * (y[..., None] / size - 0.5)
    image += rng.standard_normal(image.shape, dtype=f32) * rng.uniform(
        0.01, 0.06, (b, 1, 1, 1)
    ).astype(f32)
    return np.clip(image, 0, 1)


# ----------------------------------------------------------------------------------------------
# scenes


def subject_counts(n: int, subjects) -> dict:
    """{subject: samples} of a split of n samples over these subjects, as sample_scenes draws
    them (whatever the seed): n // len(subjects) each, and one more for each of the first
    n % len(subjects) subjects. Lets a caller check a split before rendering it."""
    k = len(subjects)
    return {s: n // k + (1 if i < n % k else 0) for i, s in enumerate(subjects)}


def sample_scenes(rng: np.random.Generator, bodies: list, n: int) -> dict:
    """Draws n scenes: subject, action, phase, camera, placement; subjects and actions balanced."""
    subject_idx = rng.permutation(np.arange(n) % len(bodies))
    action_idx = rng.permutation((np.arange(n) // len(bodies)) % len(ACTIONS))
    return {
        "subject": subject_idx,
        "action": action_idx,
        "phase": rng.random(n),
        "camera": rng.integers(0, len(CAMERAS), n),
        "yaw": rng.uniform(0, 2 * np.pi, n),
        "pitch": rng.uniform(-0.05, 0.25, n),  # camera tilt
        "distance": rng.uniform(3500.0, 6500.0, n),
        "offset_x": rng.uniform(-0.08, 0.08, n),  # of the distance
        "offset_y": rng.uniform(-0.02, 0.10, n),
        "margin": rng.uniform(0.2, 0.35, n),  # box side = (1 + margin) * larger joint extent
        "jitter": rng.uniform(-0.04, 0.04, (n, 2)),  # box centre shift, share of the side
        "gain": rng.uniform(0.8, 1.15, n),  # overall brightness of the body
        "sides_swapped": rng.random(n) < 0.5,  # warm limbs on the right instead of the left
    }


SIDE_COLOURS = ("fixed", "per-sample")


def render_scenes(scenes: dict, bodies: list, rng: np.random.Generator) -> dict:
    """Poses, cameras and rendered crops for a batch of scenes (vectorised over the batch)."""
    n = len(scenes["phase"])
    joints = np.zeros((n, 17, 3))
    ends = radii = None
    # angles per action, bodies per subject: fill row blocks, then transform all at once
    angles = {k: np.zeros(n) for k in ANGLE_KEYS}
    for ai, action in enumerate(ACTIONS):
        rows = np.flatnonzero(scenes["action"] == ai)
        if len(rows):
            for k, v in action_angles(action, scenes["phase"][rows], rng).items():
                angles[k][rows] = v
    colours = None
    for si, body in enumerate(bodies):
        rows = np.flatnonzero(scenes["subject"] == si)
        if not len(rows):
            continue
        j, e, r, s = forward_kinematics(body, {k: v[rows] for k, v in angles.items()})
        if ends is None:
            ends = np.zeros((n, *e.shape[1:]))
            radii = np.zeros((n, len(r)))
            colours = np.zeros((n, len(r), 3), dtype=np.float32)
        joints[rows], ends[rows], radii[rows] = j, e, r
        slots = np.where(scenes["sides_swapped"][rows, None], SWAPPED_SLOTS[s], s)  # (rows, P)
        colours[rows] = body["colours"][slots]
    # body frame (x left, y up, z forward) -> camera (x right, y down, z forward): a half turn
    # about x (a proper rotation: no mirror), after the yaw; then the camera's tilt and position
    to_camera = _rot("x", scenes["pitch"]) @ np.diag([1.0, -1.0, -1.0]) @ _rot("y", scenes["yaw"])
    d = scenes["distance"]
    translation = np.stack([scenes["offset_x"] * d, scenes["offset_y"] * d, d], axis=-1)  # (n, 3)
    joints_cam = np.einsum("nij,nkj->nki", to_camera, joints) + translation[:, None]
    ends_cam = np.einsum("nij,npej->npei", to_camera, ends) + translation[:, None, None]

    camera_ids = list(CAMERAS)
    focal = np.array([CAMERAS[camera_ids[c]][0] for c in scenes["camera"]])
    principal = np.array([CAMERAS[camera_ids[c]][1] for c in scenes["camera"]])
    uv = (
        focal[:, None] * joints_cam[..., :2] / joints_cam[..., 2:] + principal[:, None]
    )  # (n, 17, 2)
    lo, hi = uv.min(axis=1), uv.max(axis=1)
    side = (1 + scenes["margin"]) * (hi - lo).max(axis=1)
    centre = (lo + hi) / 2 + scenes["jitter"] * side[:, None]
    crop = np.concatenate(
        [centre - side[:, None] / 2, side[:, None]], axis=1
    )  # (n, 3) x0, y0, side
    joints_2d = (uv - crop[:, None, :2]) * (IMAGE_SIZE / side)[:, None, None]

    background = textured_background(rng, n)
    images, _, _ = render_capsules(
        ends_cam[:, :, 0],
        ends_cam[:, :, 1],
        radii,
        colours * scenes["gain"][:, None, None],
        focal,
        principal,
        crop,
        background=background,
        depth_ref=joints_cam[:, 0, 2],
    )
    images += rng.standard_normal(images.shape, dtype=np.float32) * np.float32(0.012)
    return {
        "images": (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8),
        "joints_3d": joints_cam.astype(np.float32),
        "joints_2d": joints_2d.astype(np.float32),
        "camera": [camera_ids[c] for c in scenes["camera"]],
        "crop": crop,
    }


def write_synthetic_split(
    path, subjects, n: int, seed: int, split_stream: int, progress=True, side_colours: str = "fixed"
) -> Path:
    """Renders n samples of the given subjects into one split file; the random stream is
    (seed, split_stream), so splits with different streams never share a scene. side_colours:
    'fixed' (left limbs warm) or 'per-sample' (see the module's docstring)."""
    from tqdm import tqdm

    if side_colours not in SIDE_COLOURS:
        raise ValueError(f"side_colours must be one of {SIDE_COLOURS}, got {side_colours!r}")
    rng = np.random.default_rng([int(seed), int(split_stream)])
    bodies = [make_body(s, seed) for s in subjects]
    scenes = sample_scenes(rng, bodies, n)
    if side_colours == "fixed":  # drawn all the same, so both modes render the same scenes
        scenes["sides_swapped"][:] = False
    attrs = {
        "synth_seed": int(seed),
        "side_colours": side_colours,
        "mirror_consistent": side_colours == "per-sample",
    }
    with (
        SplitWriter(path, source="synth", attrs=attrs) as writer,
        tqdm(total=n, desc=f"synth {Path(path).name}", unit="img", disable=not progress) as bar,
    ):
        for start in range(0, n, RENDER_BATCH):
            rows = slice(start, min(start + RENDER_BATCH, n))
            batch = {k: v[rows] for k, v in scenes.items()}
            out = render_scenes(batch, bodies, rng)
            writer.append(
                images=out["images"],
                joints_3d=out["joints_3d"],
                joints_2d=out["joints_2d"],
                subject=[subjects[i] for i in batch["subject"]],
                action=[ACTIONS[i] for i in batch["action"]],
                camera=out["camera"],
                frame=(np.floor(batch["phase"] * 1000).astype(np.int32) % 1000),
            )
            bar.update(rows.stop - rows.start)
    return Path(path)


def synthesize(
    out_dir,
    n_train: int = 2000,
    n_test: int = 200,
    seed: int = 0,
    progress=True,
    side_colours: str = "fixed",
) -> dict:
    """Writes out_dir/train.h5 (S1 S5 S6 S7 S8) and out_dir/test.h5 (S9 S11).

    Returns {'train': path, 'test': path, 'n_train', 'n_test', 'seconds', 'images_per_s'}.
    """
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    train = write_synthetic_split(
        out_dir / "train.h5", TRAIN_SUBJECTS, int(n_train), seed, 0, progress, side_colours
    )
    test = write_synthetic_split(
        out_dir / "test.h5", TEST_SUBJECTS, int(n_test), seed, 1, progress, side_colours
    )
    write_manifest(
        out_dir
    )  # size and sha256 of each file, checked by nodes that fetch --data s3://...
    seconds = time.perf_counter() - t0
    return {
        "train": str(train),
        "test": str(test),
        "n_train": int(n_train),
        "n_test": int(n_test),
        "seconds": seconds,
        "images_per_s": (n_train + n_test) / seconds,
    }


# ----------------------------------------------------------------------------------------------
# command line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default="data/synth", help="output directory (default: data/synth)"
    )
    parser.add_argument(
        "--train", type=_positive_int, default=2000, help="training samples (default 2000)"
    )
    parser.add_argument(
        "--test", type=_positive_int, default=200, help="test samples (default 200)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--side-colours",
        choices=SIDE_COLOURS,
        default="fixed",
        help="fixed: left limbs warm, trained without flip (default); per-sample: "
        "the warm side drawn per sample, trained with flip",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace train.h5 and test.h5 if --out holds them (default: refuse)",
    )


def run(args) -> int:
    # everything is checked before the first image is rendered; an existing dataset is replaced
    # only with --force, and then file by file by rename (SplitWriter), never half-written
    if not 0 <= args.seed < 2**32:
        raise InputError(f"--seed must be in [0, 2**32), got {args.seed}")
    out = output_dir(args.out, "--out")
    refuse_existing([out / "train.h5", out / "test.h5"], "--out", args.force)
    result = synthesize(
        args.out,
        args.train,
        args.test,
        args.seed,
        progress=not args.no_progress,
        side_colours=args.side_colours,
    )
    print(
        f"wrote {result['train']} ({result['n_train']} samples) and {result['test']} "
        f"({result['n_test']} samples) in {result['seconds']:.1f} s: "
        f"{result['images_per_s']:.0f} images/s"
    )
    return 0


def add_arguments_samples(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="an HDF5 split file (raypose schema)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument(
        "--n", type=_positive_int, default=16, help="number of samples (default 16)"
    )
    parser.add_argument("--skeleton", action="store_true", help="draw the 2D skeleton on each crop")
    parser.add_argument(
        "--scale", type=_positive_int, default=2, help="upscaling of each crop (default 2)"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace --out if it exists (default: refuse)"
    )


def sample_grid(path, n: int = 16, skeleton: bool = False, scale: int = 2):
    """A PIL image: n crops of the file (evenly spaced rows) in a near-square grid, each labelled
    with subject and action; with skeleton=True the 2D joints are drawn (left yellow, right cyan)."""
    import h5py
    from PIL import Image, ImageDraw

    info = validate_file(path, check_values=False)
    rows = np.unique(np.linspace(0, info["n"] - 1, min(n, info["n"])).round().astype(int))
    with h5py.File(path, "r") as f:
        images = f["images"][rows]
        joints_2d = f["joints_2d"][rows]
        subjects = f["subject"].asstr()[rows]
        actions = f["action"].asstr()[rows]
    cols = int(np.ceil(np.sqrt(len(rows))))
    grid_rows = int(np.ceil(len(rows) / cols))
    cell = IMAGE_SIZE * scale
    sheet = Image.new("RGB", (cols * cell, grid_rows * cell), (0, 0, 0))
    left, right = set(H36M_SKELETON.joints_left), set(H36M_SKELETON.joints_right)
    for k in range(len(rows)):
        tile = Image.fromarray(images[k]).resize((cell, cell), Image.NEAREST)
        draw = ImageDraw.Draw(tile)
        if skeleton:
            pts = joints_2d[k] * scale
            for child, parent in H36M_SKELETON.bones():
                colour = (
                    (255, 230, 0)
                    if child in left
                    else (0, 230, 255)
                    if child in right
                    else (255, 255, 255)
                )
                draw.line([tuple(pts[parent]), tuple(pts[child])], fill=colour, width=2)
        draw.text((3, 2), f"{subjects[k]} {actions[k]}", fill=(255, 255, 255))
        sheet.paste(tile, ((k % cols) * cell, (k // cols) * cell))
    return sheet


MAX_SCALE = 16  # 16 x 128 px per crop is already a 2048 px tile


def run_samples(args) -> int:
    existing_file(args.data, "--data", "HDF5 file")
    out = output_file(args.out, "--out", args.force, suffixes=(".png",))
    if args.scale > MAX_SCALE:
        raise InputError(f"--scale must be at most {MAX_SCALE}, got {args.scale}")
    sheet = sample_grid(args.data, args.n, args.skeleton, args.scale)
    with replace_atomically(out) as tmp:
        sheet.save(tmp, format="PNG")
    print(f"wrote {out} ({args.n} samples of {args.data})")
    return 0
