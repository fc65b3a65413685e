"""The FID InceptionV3: key layout of the pytorch-fid weights file, forward parity, loading.

The real weights (pt_inception-2015-12-05-6726825d.pth, 92 MB) are not in the
repository. The layout and the forward pass are checked against golden values
taken from pytorch-fid itself: in an environment with pytorch-fid 0.3.0,
torchvision 0.29.1 and torch 2.14.1, ``pytorch_fid.inception.fid_inception_v3()``
was built with ``load_state_dict_from_url`` patched to return the weights of
:func:`seeded_state_dict`, and ``InceptionV3([3])`` (pool features) and its
``fc`` were run on the inputs of :func:`seeded_inputs` (the script is
``_GOLDEN_ORIGIN`` below). That network is torchvision's ``Inception3`` with
pytorch-fid's FID blocks, so equal outputs here mean equal architecture,
including the TF-style pooling quirks and the bilinear resize.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from noisecraft.errors import CheckpointError
from noisecraft.metrics.inception import FEATURE_DIM, FIDInceptionV3, load_fid_inception

# sha256 of "key:shape" lines (sorted) of fid_inception_v3().state_dict() from pytorch-fid 0.3.0.
PYTORCH_FID_LAYOUT_SHA256 = "ae219ebd25e62d5b78106b4b100106f89da40333a59e4038502df9a4e91abd7f"
PYTORCH_FID_NUM_KEYS = 566  # including 94 BatchNorm num_batches_tracked buffers
# Parameters of torchvision's inception_v3 (27,161,264) minus the aux head (3,326,696)
# plus 8 extra classes (8 * 2049): 23,850,960; pytorch-fid's model gives the same count.
PYTORCH_FID_NUM_PARAMS = 23_850_960

# Golden outputs of pytorch-fid 0.3.0 (torchvision 0.29.1, torch 2.14.1, CPU) on the seeded
# weights and inputs below, made by _GOLDEN_ORIGIN run from the repository root.
GOLDEN_IDX = [1, 5, 400, 1000, 1500, 1900, 2040]  # every branch of Mixed_7c
GOLDEN_BIG = [
    9.210089683532715,
    5.9827046394348145,
    0.6341299414634705,
    0.016840288415551186,
    5.710728645324707,
    15.037303924560547,
    3.0545167922973633,
]
GOLDEN_SMALL = [
    [
        6.256896018981934,
        4.498006820678711,
        0.37975013256073,
        0.018095705658197403,
        3.945380210876465,
        10.046284675598145,
        2.021404981613159,
    ],
    [
        6.204218864440918,
        4.502730369567871,
        0.3283986747264862,
        0.017671512439846992,
        3.88112735748291,
        9.965829849243164,
        1.8504266738891602,
    ],
]
GOLDEN_BIG_SUM = 7426.80029296875
GOLDEN_LOGITS = [-1.330819845199585, -7.6821393966674805, -7.697549819946289, 2.4076199531555176]

_GOLDEN_ORIGIN = r"""
import ast, hashlib, torch, pytorch_fid.inception as pi
src = open("tests/test_inception.py").read()
ns = {"torch": torch}
for node in ast.parse(src).body:
    if isinstance(node, ast.FunctionDef) and node.name in ("seeded_state_dict", "seeded_inputs"):
        exec(ast.get_source_segment(src, node), ns)
captured = []
pi.load_state_dict_from_url = lambda *a, **k: {}
orig = torch.nn.Module.load_state_dict
torch.nn.Module.load_state_dict = lambda self, sd, *a, **k: captured.append(self)
pi.fid_inception_v3()  # layout from pytorch-fid's own model, loading skipped
torch.nn.Module.load_state_dict = orig
template = dict(captured[0].state_dict())
pi.load_state_dict_from_url = lambda *a, **k: template
lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(template.items()))
print("layout", len(template), hashlib.sha256(lines.encode()).hexdigest())
weights = ns["seeded_state_dict"](dict(template))
template.clear(); template.update(weights)
net = pi.InceptionV3([3]).eval()
fc = pi.fid_inception_v3().fc
print("params", sum(p.numel() for p in pi.fid_inception_v3().parameters()))
big, small = ns["seeded_inputs"]()
with torch.no_grad():
    fb = net((big + 1) / 2)[0].flatten(1)
    fs = net((small + 1) / 2)[0].flatten(1)
    lg = fc(fb)
torch.set_printoptions(precision=8)
idx = [1, 5, 400, 1000, 1500, 1900, 2040]  # every branch of Mixed_7c
print("GOLDEN_BIG =", fb[0, idx].tolist())
print("GOLDEN_SMALL =", fs[:, idx].tolist())
print("GOLDEN_BIG_SUM =", fb.sum().item())
print("GOLDEN_SMALL_SUM =", fs.sum().item())
print("GOLDEN_LOGITS =", lg[0, :5].tolist(), lg.abs().max().item())
"""


def seeded_state_dict(template: dict) -> dict:
    """Deterministic weights for every key of ``template`` (a state dict), in sorted key order."""
    g = torch.Generator().manual_seed(1234)
    out = {}
    for key in sorted(template):
        shape = template[key].shape
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(0, dtype=torch.long)
        elif key.endswith("conv.weight") or key == "fc.weight":
            fan_in = shape[1:].numel()
            out[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("bn.weight"):
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:  # bn.bias, running_mean, fc.bias
            out[key] = 0.1 * torch.randn(shape, generator=g)
    return out


def seeded_inputs() -> tuple:
    """One 299x299 image and two 64x64 images (resized to 299 inside), in [-1, 1]."""
    g = torch.Generator().manual_seed(99)
    return torch.rand(1, 3, 299, 299, generator=g) * 2 - 1, torch.rand(
        2, 3, 64, 64, generator=g
    ) * 2 - 1


def _template() -> dict:
    with torch.device("meta"):  # shapes only, no random init
        return FIDInceptionV3().state_dict()


def _layout(state: dict) -> str:
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(state.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def test_layout_matches_pytorch_fid_keys_and_shapes():
    state = _template()
    assert len(state) == PYTORCH_FID_NUM_KEYS
    assert _layout(state) == PYTORCH_FID_LAYOUT_SHA256
    with torch.device("meta"):
        params = sum(p.numel() for p in FIDInceptionV3().parameters())
    assert params == PYTORCH_FID_NUM_PARAMS


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """Random weights in the pytorch-fid layout, saved as a .pth like the real file."""
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    state = seeded_state_dict(_template())
    torch.save(state, path)
    return path


def test_pth_file_loads_with_no_missing_or_unexpected_keys(weights_file):
    model = load_fid_inception(weights_file)
    expected = torch.load(weights_file, weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert not model.training


def test_file_without_batch_counters_loads(tmp_path):
    # The ported weights predate BatchNorm's num_batches_tracked buffer.
    state = seeded_state_dict(_template())
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    load_fid_inception(path)


def test_safetensors_file_loads(tmp_path):
    from safetensors.torch import save_file

    state = seeded_state_dict(_template())
    path = tmp_path / "inception.safetensors"
    save_file(state, str(path))
    model = load_fid_inception(path)
    assert torch.equal(model.fc.weight, state["fc.weight"])


@pytest.fixture(scope="module")
def outputs(weights_file):
    """Features of the 299x299 image, of a 64x64 image, and of that image resized outside."""
    model = load_fid_inception(weights_file)
    big, small = seeded_inputs()
    small = small[:1]
    resized = torch.nn.functional.interpolate(small, size=(299, 299), mode="bilinear")
    with torch.no_grad():
        f_big, f_resized = model.features(torch.cat([big, resized])).split(1)
        return f_big, model.features(small), model.classify(f_big), f_resized


def test_output_shapes_and_parity_with_pytorch_fid(outputs):
    f_big, f_small, logits, _ = outputs
    assert f_big.shape == (1, FEATURE_DIM) and f_small.shape == (1, FEATURE_DIM)
    assert logits.shape == (1, 1008)
    # Golden values from pytorch-fid (see module docstring): InceptionV3([3]) on (x + 1) / 2.
    torch.testing.assert_close(f_big[0, GOLDEN_IDX], torch.tensor(GOLDEN_BIG), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        f_small[0, GOLDEN_IDX], torch.tensor(GOLDEN_SMALL[0]), rtol=1e-4, atol=1e-5
    )
    assert f_big.sum().item() == pytest.approx(GOLDEN_BIG_SUM, rel=1e-5)
    torch.testing.assert_close(logits[0, :4], torch.tensor(GOLDEN_LOGITS), rtol=1e-4, atol=1e-4)


def test_smaller_inputs_are_resized_bilinearly_to_299(outputs):
    _, f_small, _, f_resized = outputs
    torch.testing.assert_close(f_small, f_resized)


def test_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_fid_inception(tmp_path / "nowhere.pth")
    msg = str(e.value)
    assert "\n" not in msg
    assert "pt_inception-2015-12-05-6726825d.pth" in msg and "https://" in msg


def test_wrong_file_is_rejected(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(CheckpointError, match="not the FID InceptionV3"):
        load_fid_inception(path)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_fid_inception(tmp_path / "garbage.pth")
