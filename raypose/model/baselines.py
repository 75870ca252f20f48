"""Image baselines beside the mean pose: what a reader gets from the crops without a network.

Both read the same features of a crop (`image_features`): the centre 112 x 112 crop the network
sees at test time, in grey (ITU-R BT.601 luma), averaged over 7 x 7 pixel blocks to 16 x 16, then
minus its own mean and over its own standard deviation (so a brighter or darker copy of a crop has
the same features). 256 float32 numbers, 1 KB a sample.

- **Nearest neighbour** (`nearest_neighbour`): the root-relative training pose of the training
  crop whose features are closest (Euclidean) to the test crop's. Distances are computed in
  blocks of test rows that keep the distance matrix under `memory_bytes`.
- **Ridge regression** (`fit_ridge`, `predict_ridge`): a linear map from the features to the
  17 x 3 root-relative pose, closed form, with an unpenalised intercept. Its penalty is
  lambda = alpha x (the mean eigenvalue of the centred features' Gram matrix); alpha is chosen
  from RIDGE_ALPHAS on a validation split of the training samples only (`validation_split`:
  one held-out training subject, or the last fifth of the rows when there is one subject), and
  the map is then refitted on all training samples.

`image_baselines` runs both for an evaluation: features of at most `max_train` training samples
(evenly spaced over the selection, MAX_TRAIN by default) read `chunk` images at a time, so memory
stays near max_train KB of features plus one chunk of images; the test set's features likewise.
Pure numpy: the datasets only need `read_images(positions)` (raypose.data.dataset.PoseDataset's).
"""

import numpy as np

from raypose.model.metrics import mpjpe

CROP = 112  # the centre crop the network sees at test time
GRID = 16  # features per side: 112 / 16 = 7 pixel blocks
FEATURES = GRID * GRID
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601
MAX_TRAIN = 100_000  # training samples the baselines read at most: 100 MB of features
READ_CHUNK = 256  # images read and reduced at a time: 13 MB of uint8, 39 MB as float32
NN_MEMORY_BYTES = 64 * 2**20  # the distance block of nearest_neighbour
RIDGE_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
DEFAULT_ALPHA = 1.0  # used when the training samples are too few to hold any out
VALIDATION_SHARE = 0.2  # of the rows, held out when there is only one training subject
FEATURES_TEXT = (
    "centre 112 x 112 crop, grey, 7 x 7 block means (16 x 16), each crop minus its mean over "
    "its standard deviation"
)


def image_features(images: np.ndarray) -> np.ndarray:
    """uint8 crops [B, H, W, 3] (H = W >= 112) -> float32 features [B, 256] (module docstring).
    A crop of one flat colour has all-zero features."""
    images = np.asarray(images)
    assert images.ndim == 4 and images.shape[-1] == 3, images.shape
    b, h, w, _ = images.shape
    assert h == w >= CROP, images.shape
    top = (h - CROP) // 2
    crop = images[:, top : top + CROP, top : top + CROP]
    grey = crop.astype(np.float32) @ LUMA  # [B, 112, 112]
    block = CROP // GRID
    small = grey.reshape(b, GRID, block, GRID, block).mean(axis=(2, 4)).reshape(b, FEATURES)
    small -= small.mean(axis=1, keepdims=True)
    std = small.std(axis=1, keepdims=True)
    return np.divide(small, std, out=np.zeros_like(small), where=std > 1e-6)


def dataset_features(read_images, positions, chunk: int = READ_CHUNK) -> np.ndarray:
    """Features [len(positions), 256] of a dataset's samples, read `chunk` at a time.
    read_images(positions) -> (images of the distinct rows, index of each position into them),
    as PoseDataset.read_images."""
    positions = np.asarray(positions, dtype=np.int64)
    out = np.empty((len(positions), FEATURES), dtype=np.float32)
    for start in range(0, len(positions), chunk):
        images, where = read_images(positions[start : start + chunk])
        out[start : start + chunk] = image_features(images)[where]
    return out


def nearest_neighbour(
    train_features: np.ndarray, test_features: np.ndarray, memory_bytes: int = NN_MEMORY_BYTES
) -> np.ndarray:
    """Index of the nearest training row (Euclidean) for each test row; the first on ties.
    [N, D] and [M, D] -> [M] int64. The [rows, N] distance block stays under memory_bytes."""
    train = np.asarray(train_features, dtype=np.float32)
    test = np.asarray(test_features, dtype=np.float32)
    assert train.ndim == 2 and test.ndim == 2 and train.shape[1] == test.shape[1]
    assert len(train) > 0, "no training rows"
    train_sq = (train * train).sum(axis=1)  # [N]
    rows = max(1, int(memory_bytes) // (4 * len(train)))
    out = np.empty(len(test), dtype=np.int64)
    for start in range(0, len(test), rows):
        block = test[start : start + rows]
        # |t - x|^2 without |t|^2, which does not change the argmin over x
        dist = train_sq[None, :] - 2.0 * (block @ train.T)  # [rows, N]
        out[start : start + rows] = dist.argmin(axis=1)
    return out


def _moments(features: np.ndarray, targets: np.ndarray, chunk: int = 8192) -> tuple:
    """Means of features and targets, and the centred Gram matrices X'X [D, D] and X'Y [D, T]
    in float64, accumulated `chunk` rows at a time."""
    x_mean = features.mean(axis=0, dtype=np.float64)
    y_mean = targets.mean(axis=0, dtype=np.float64)
    xx = np.zeros((features.shape[1],) * 2)
    xy = np.zeros((features.shape[1], targets.shape[1]))
    for start in range(0, len(features), chunk):
        x = features[start : start + chunk].astype(np.float64) - x_mean
        y = targets[start : start + chunk].astype(np.float64) - y_mean
        xx += x.T @ x
        xy += x.T @ y
    return x_mean, y_mean, xx, xy


def fit_ridge(features: np.ndarray, poses: np.ndarray, alphas=(DEFAULT_ALPHA,)) -> list:
    """One ridge map per alpha: dicts {'alpha', 'lambda', 'weights' [D, K*3], 'x_mean', 'y_mean'}.

    features [N, D], poses [N, K, 3]. lambda = alpha x trace(X'X) / D on the centred features, so
    alpha does not depend on N or on the features' scale; the intercept (the means) is not
    penalised."""
    features = np.asarray(features)
    poses = np.asarray(poses, dtype=np.float64)
    assert features.ndim == 2 and poses.ndim == 3 and len(features) == len(poses)
    targets = poses.reshape(len(poses), -1)
    x_mean, y_mean, xx, xy = _moments(features, targets)
    scale = max(np.trace(xx) / xx.shape[0], 1e-12)
    maps = []
    for alpha in alphas:
        lam = float(alpha) * scale
        weights = np.linalg.solve(xx + lam * np.eye(len(xx)), xy)
        maps.append(
            {
                "alpha": float(alpha),
                "lambda": lam,
                "weights": weights,
                "x_mean": x_mean,
                "y_mean": y_mean,
            }
        )
    return maps


def predict_ridge(ridge: dict, features: np.ndarray, joints: int = 17) -> np.ndarray:
    """[M, D] features -> [M, joints, 3] poses of one fit_ridge map."""
    x = np.asarray(features, dtype=np.float64) - ridge["x_mean"]
    return (x @ ridge["weights"] + ridge["y_mean"]).reshape(len(x), joints, 3)


def validation_split(groups) -> tuple:
    """(held-out mask, text) over the training samples, for choosing alpha: the samples of the
    last group (subject) in sorted order when there are two or more groups, else the last
    VALIDATION_SHARE of the rows (consecutive frames, which a row-wise shuffle would put on both
    sides). (None, reason) when there are too few samples to hold any out."""
    groups = np.asarray(groups)
    names = sorted(set(groups.tolist()))
    if len(names) >= 2:
        held = groups == names[-1]
        return held, f"training subject {names[-1]} held out"
    n_held = int(round(VALIDATION_SHARE * len(groups)))
    if len(groups) < 5 or n_held < 1:
        return None, f"{len(groups)} training samples: too few to hold any out"
    held = np.zeros(len(groups), dtype=bool)
    held[len(groups) - n_held :] = True
    return held, f"the last {n_held} of {len(groups)} training rows held out"


def choose_ridge(features, poses, groups, alphas=RIDGE_ALPHAS) -> dict:
    """The ridge map refitted on all samples with the alpha whose map, fitted without the held-out
    samples (validation_split), had the lowest MPJPE on them. Adds 'validation': {'split',
    'mpjpe_by_alpha' or None}."""
    held, text = validation_split(groups)
    if held is None:
        ridge = fit_ridge(features, poses, (DEFAULT_ALPHA,))[0]
        ridge["validation"] = {
            "split": f"{text}; alpha {DEFAULT_ALPHA} fixed",
            "mpjpe_by_alpha": None,
        }
        return ridge
    fits = fit_ridge(features[~held], poses[~held], alphas)
    scores = {m["alpha"]: mpjpe(predict_ridge(m, features[held]), poses[held]) for m in fits}
    best = min(scores, key=lambda a: (scores[a], a))
    ridge = fit_ridge(features, poses, (best,))[0]
    ridge["validation"] = {
        "split": text,
        "mpjpe_by_alpha": {f"{a:g}": float(v) for a, v in scores.items()},
    }
    return ridge


def grouped_baseline(pred: np.ndarray, gt: np.ndarray, actions) -> dict:
    """{'mpjpe' (all samples), 'per_action', 'mean_over_actions' (each action once)}, the shape of
    an evaluation report's mean_pose_baseline entry."""
    actions = np.asarray(actions)
    per_action = {
        str(a): mpjpe(pred[actions == a], gt[actions == a]) for a in sorted(set(actions.tolist()))
    }
    return {
        "mpjpe": mpjpe(pred, gt),
        "per_action": per_action,
        "mean_over_actions": float(np.mean(list(per_action.values()))),
    }


def evenly_spaced(n: int, at_most: int) -> np.ndarray:
    """at_most positions of 0..n-1, evenly spaced (all n when n <= at_most)."""
    if n <= at_most:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, at_most).round().astype(np.int64))


def image_baselines(
    train,
    train_poses: np.ndarray,
    train_groups,
    test,
    test_positions,
    test_poses: np.ndarray,
    test_actions,
    max_train: int = MAX_TRAIN,
) -> dict:
    """The nearest-neighbour and ridge baselines of an evaluation, on the test samples at
    test_positions (their root-relative poses test_poses [M, 17, 3] and actions).

    train, test: objects with read_images(positions) (PoseDataset); train_poses [N, 17, 3]
    root-relative and train_groups [N] (subject names) of all N training samples. Returns
    {'nearest_neighbour_baseline', 'ridge_baseline'}: grouped_baseline's keys, plus
    'train_samples' and 'features', and for ridge 'alpha', 'lambda' and 'validation'."""
    train_poses = np.asarray(train_poses, dtype=np.float64)
    test_poses = np.asarray(test_poses, dtype=np.float64)
    use = evenly_spaced(len(train_poses), max_train)
    train_features = dataset_features(train.read_images, use)
    test_features = dataset_features(test.read_images, test_positions)
    poses = train_poses[use]
    common = {"train_samples": int(len(use)), "features": FEATURES_TEXT}
    nearest = poses[nearest_neighbour(train_features, test_features)]
    ridge = choose_ridge(train_features, poses, np.asarray(train_groups)[use])
    return {
        "nearest_neighbour_baseline": {
            **grouped_baseline(nearest, test_poses, test_actions),
            **common,
        },
        "ridge_baseline": {
            **grouped_baseline(predict_ridge(ridge, test_features), test_poses, test_actions),
            **common,
            "alpha": ridge["alpha"],
            "lambda": ridge["lambda"],
            "validation": ridge["validation"],
        },
    }
