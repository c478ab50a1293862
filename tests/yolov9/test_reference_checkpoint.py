"""yolov9.load_reference_checkpoint: the reference's checkpoint files, read without executing them.

Two fixtures were written by the reference implementation itself, with its outputs for an input.
The other layouts are checked by round trips: the project's own models written in the reference's
file format (a torch zip whose pickle names ``models.yolo.DetectionModel``, ``models.common.*`` and
``torch.nn`` modules, with the layer list in ``yaml`` and half-precision weights).
"""

import copy
import hashlib
import os
import pickle
import shlex
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from yolov9 import MODEL_NAMES, build_model, load_reference_checkpoint, prune
from yolov9.model import CONFIG_DIR
from yolov9.reference import ReferenceLayoutError
from yolov9.safe_unpickle import CheckpointFormatError, UnsafeCheckpointError, load_inert

pytestmark = [pytest.mark.own_process, pytest.mark.process_group("beside-main"), pytest.mark.cost(30)]

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "reference-checkpoints"
REFERENCE_FILES = {"yolov9-t.pt": ("yolov9-t", 80), "gelan-t-nc3.pt": ("gelan-t", 3)}

# The reference's classes, by module; every other module in its models is a torch.nn one.
REFERENCE_CLASSES = {
    "models.yolo": ("DetectionModel", "DDetect", "DualDDetect"),
    "models.common": (
        "Conv",
        "RepConvN",
        "RepNBottleneck",
        "RepNCSP",
        "RepNCSPELAN4",
        "ELAN1",
        "AConv",
        "ADown",
        "SPPELAN",
        "CBLinear",
        "CBFuse",
        "Silence",
        "Concat",
        "DFL",
    ),
}


def fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_file():
        pytest.fail(f"missing fixture {path} (see {FIXTURES / 'README.md'})")
    return path


def relative_to_image(pred: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes (xywh pixels) as fractions of the image size; class probabilities unchanged."""
    scale = torch.ones(pred.shape[1])
    scale[:4] = torch.tensor([width, height, width, height], dtype=torch.float)
    return pred / scale.view(1, -1, 1)


@pytest.mark.parametrize("name", REFERENCE_FILES)
def test_reference_file_reproduces_the_reference_output(name):
    model = load_reference_checkpoint(fixture(name))
    expected = torch.load(fixture(name.replace(".pt", ".expected.pt")), weights_only=True)
    x = expected["x"]
    with torch.no_grad():
        out = model(x)
    h, w = x.shape[2:]
    torch.testing.assert_close(
        relative_to_image(out, h, w), relative_to_image(expected["main"], h, w), rtol=1e-5, atol=1e-8
    )


@pytest.mark.parametrize("name", REFERENCE_FILES)
def test_reference_file_gives_its_layout_and_class_count_in_float32_eval_mode(name):
    layout, nc = REFERENCE_FILES[name]
    model = load_reference_checkpoint(fixture(name))
    assert (model.name, model.num_classes, model.training) == (layout, nc, False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_reference_file_describes_itself_for_lineage():
    path = fixture("gelan-t-nc3.pt")
    info = load_reference_checkpoint(path).reference_info
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (info.layout, info.num_classes, info.epoch) == ("gelan-t", 3, -1)
    assert (info.source_config, info.class_names, info.weights) == ("gelan-t.yaml", ("0", "1", "2"), "model")


def test_dual_reference_file_prunes_to_its_main_branch():
    model = load_reference_checkpoint(fixture("yolov9-t.pt"))
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(prune(model)(x), model(x), rtol=1e-4, atol=1e-4)


# --- files in the reference's format, written from the project's own models ----------------------


@pytest.fixture
def reference_modules(monkeypatch) -> dict[str, type]:
    """Plain classes importable as ``models.common.X`` / ``models.yolo.X``, so pickle writes those names."""
    stubs: dict[str, type] = {}
    monkeypatch.setitem(sys.modules, "models", types.ModuleType("models"))
    for module, names in REFERENCE_CLASSES.items():
        monkeypatch.setitem(sys.modules, module, types.ModuleType(module))
        for name in names:
            stubs[name] = type(name, (), {"__module__": module, "__qualname__": name})
            setattr(sys.modules[module], name, stubs[name])
    return stubs


def as_reference_module(module: nn.Module, stubs: dict[str, type]) -> object:
    """The module as the reference pickles it: same ``__dict__``, class named like the reference's."""
    if isinstance(module, nn.Upsample):
        plain = nn.Upsample(scale_factor=module.scale_factor, mode=module.mode)
        plain.training = module.training
        return plain
    children = {k: as_reference_module(v, stubs) for k, v in module._modules.items()}
    if type(module).__module__.startswith("torch.nn"):
        out = copy.copy(module)
    else:
        out = stubs[type(module).__name__]()
        out.__dict__.update(module.__dict__)
    out._modules = children
    return out


def reference_rows(config: dict, leading_silence: bool) -> dict:
    """Our config's rows spelled as the reference spells them, optionally behind an extra Silence layer."""
    shift = 1 if leading_silence else 0

    def spell(row: list) -> list:
        source, repeats, block, args = row
        refs = [j if j == -1 else j + shift for j in ([source] if isinstance(source, int) else source)]
        source = refs[0] if isinstance(source, int) else refs
        block = "nn.Upsample" if block == "Upsample" else block
        return [source, repeats, block, ["None" if a is None else a for a in args]]

    backbone = [spell(r) for r in config["backbone"]]
    if leading_silence:
        backbone.insert(0, [-1, 1, "Silence", []])
    return {
        "depth_multiple": 1.0,
        "width_multiple": 1.0,
        "backbone": backbone,
        "head": [spell(r) for r in config["head"]],
    }


def with_random_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics that half precision holds exactly, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p + 0.01 * torch.randn(p.shape, generator=g))
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                n = bn.num_features
                bn.running_mean.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)
                bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                bn.num_batches_tracked.fill_(7)
    return model.half().float().eval()


def model_record(model, stubs: dict[str, type], leading_silence: bool = False) -> object:
    """``model`` as the reference pickles its DetectionModel: fp16, layers in ``model``, rows in ``yaml``."""
    spec = yaml.safe_load((CONFIG_DIR / f"{model.name}.yaml").read_text())
    layers = [as_reference_module(layer, stubs) for layer in copy.deepcopy(model).half().layers]
    layers[-1].stride = model.head.stride.clone()  # a plain attribute in the reference's head
    if leading_silence:
        layers.insert(0, stubs["Silence"]())
        layers[0].__dict__.update(nn.Module().__dict__)
    container = nn.Sequential()
    container._modules = {str(i): m for i, m in enumerate(layers)}
    record = stubs["DetectionModel"]()
    record.__dict__.update(nn.Module().__dict__)
    record._modules = {"model": container}
    record.yaml = reference_rows(spec, leading_silence) | {"nc": model.num_classes}
    record.yaml_file = f"{model.name}.yaml"
    record.names = [f"class{i}" for i in range(model.num_classes)]
    record.stride = model.head.stride.clone()
    return record


def write_reference_file(path: Path, model, stubs, leading_silence: bool = False, **checkpoint) -> Path:
    """A checkpoint dict as the reference's training script saves it, with ``model`` as its model."""
    content = {"epoch": -1, "best_fitness": None, "model": model_record(model, stubs, leading_silence)}
    torch.save(content | {"ema": None, "updates": None, "optimizer": None} | checkpoint, path)
    return path


def probe(seed: int = 1) -> torch.Tensor:
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def outputs_equal(a: nn.Module, b: nn.Module) -> bool:
    with torch.no_grad():
        return torch.equal(a(probe()), b(probe()))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_layout_round_trips_through_the_reference_format(name, reference_modules, tmp_path):
    original = with_random_statistics(build_model(name, num_classes=5))
    loaded = load_reference_checkpoint(
        write_reference_file(tmp_path / f"{name}.pt", original, reference_modules)
    )
    assert (loaded.name, loaded.num_classes, loaded.reference_info.layout) == (name, 5, name)
    theirs = original.state_dict()
    assert loaded.state_dict().keys() == theirs.keys()
    assert all(torch.equal(v, theirs[k]) for k, v in loaded.state_dict().items())
    assert outputs_equal(loaded, original)


def test_layers_are_matched_past_an_extra_leading_identity_layer(reference_modules, tmp_path):
    original = with_random_statistics(build_model("gelan-t", num_classes=2))
    path = write_reference_file(tmp_path / "shifted.pt", original, reference_modules, leading_silence=True)
    assert outputs_equal(load_reference_checkpoint(path), original)


def test_ema_weights_are_preferred_to_the_raw_model(reference_modules, tmp_path):
    raw = with_random_statistics(build_model("gelan-t", num_classes=2), seed=0)
    ema = with_random_statistics(build_model("gelan-t", num_classes=2), seed=1)
    path = write_reference_file(
        tmp_path / "both.pt", raw, reference_modules, ema=model_record(ema, reference_modules)
    )
    loaded = load_reference_checkpoint(path)
    assert loaded.reference_info.weights == "ema"
    assert outputs_equal(loaded, ema)


def test_legacy_torch_format_is_read_too(reference_modules, tmp_path):
    original = with_random_statistics(build_model("gelan-t", num_classes=2))
    path = tmp_path / "legacy.pt"
    torch.save(
        {"epoch": 4, "model": model_record(original, reference_modules)},
        path,
        _use_new_zipfile_serialization=False,
    )
    assert path.read_bytes()[:2] != b"PK"
    loaded = load_reference_checkpoint(path)
    assert loaded.reference_info.epoch == 4
    assert outputs_equal(loaded, original)


def test_numpy_scalars_and_arrays_are_read_as_plain_numbers(reference_modules, tmp_path):
    original = with_random_statistics(build_model("gelan-t", num_classes=2))
    path = write_reference_file(
        tmp_path / "numpy.pt",
        original,
        reference_modules,
        epoch=np.int64(12),
        best_fitness=np.array([0.25, 0.5]),
    )
    content = load_inert(path)
    assert type(content["epoch"]) is int and content["epoch"] == 12
    assert content["best_fitness"].tolist() == [0.25, 0.5]
    assert load_reference_checkpoint(path).reference_info.epoch == 12


def test_shapes_recorded_as_torch_size_are_read(reference_modules, tmp_path):
    """The reference trained with torch 2.14 pickles torch.Size values in its checkpoints."""
    original = with_random_statistics(build_model("gelan-t", num_classes=2))
    path = write_reference_file(tmp_path / "size.pt", original, reference_modules, imgsz=torch.Size([64, 48]))
    assert load_inert(path)["imgsz"] == (64, 48)
    assert outputs_equal(load_reference_checkpoint(path), original)


def test_a_torch_size_of_anything_but_ints_is_refused(tmp_path):
    class NotASize:
        def __reduce__(self):
            return torch.Size, (("rm -rf", 1),)

    path = tmp_path / "size.pt"
    torch.save({"epoch": 1, "shape": NotASize()}, path)
    with pytest.raises(CheckpointFormatError, match="torch.Size of something other than a tuple of ints"):
        load_inert(path)


# --- refusals and clear errors ------------------------------------------------------------------


class RunsAShellCommand:
    """Unpickling this runs ``touch MARKER`` through os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_the_malicious_payload_is_live_when_unpickled_normally(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(RunsAShellCommand(marker), protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_file_that_would_run_code_is_refused_without_running_it(zip_format, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save(
        {"epoch": 1, "model": RunsAShellCommand(marker)}, path, _use_new_zipfile_serialization=zip_format
    )
    with pytest.raises(UnsafeCheckpointError, match=rf"{os.system.__module__}\.system"):
        load_reference_checkpoint(path)
    assert not marker.exists()


def test_builtins_eval_is_refused_by_name(tmp_path):
    path = tmp_path / "eval.pt"
    torch.save({"model": Evaluates()}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.eval"):
        load_reference_checkpoint(path)


class Evaluates:
    def __reduce__(self):
        return eval, ("1 + 1",)


def test_a_truncated_file_is_a_clear_error(tmp_path):
    data = fixture("gelan-t-nc3.pt").read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt"):
        load_reference_checkpoint(path)


def test_a_truncated_legacy_file_is_a_clear_error(reference_modules, tmp_path):
    original = build_model("gelan-t", num_classes=2).eval()
    path = tmp_path / "legacy.pt"
    torch.save(
        {"model": model_record(original, reference_modules)}, path, _use_new_zipfile_serialization=False
    )
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        load_reference_checkpoint(path)


def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="not a torch checkpoint"):
        load_reference_checkpoint(path)


def test_a_checkpoint_without_a_model_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"epoch": 3, "model": build_model("gelan-t").state_dict()}, path)
    with pytest.raises(ReferenceLayoutError, match="no pickled reference model"):
        load_reference_checkpoint(path)


def test_an_unknown_layer_list_is_an_unrecognised_layout(reference_modules, tmp_path):
    record = model_record(build_model("gelan-t", num_classes=2).eval(), reference_modules)
    record.yaml["head"][3][3] = [96, 96, 48, 2]  # one RepNCSPELAN4 with 2 bottlenecks, as no model has
    path = tmp_path / "odd.pt"
    torch.save({"model": record}, path)
    with pytest.raises(
        ReferenceLayoutError,
        match="unrecognised layout.*closest, gelan-t, differs first at non-identity layer 12",
    ):
        load_reference_checkpoint(path)


def test_an_unknown_block_is_an_unrecognised_layout(reference_modules, tmp_path):
    record = model_record(build_model("gelan-t", num_classes=2).eval(), reference_modules)
    record.yaml["head"][-1][2] = "TripleDDetect"
    path = tmp_path / "triple.pt"
    torch.save({"model": record}, path)
    with pytest.raises(ReferenceLayoutError, match="unrecognised layout.*TripleDDetect"):
        load_reference_checkpoint(path)


def layer_of(record: object, dotted: str) -> object:
    """The module at ``dotted`` (``'4.cv1.conv'``) under a written model record's layer list."""
    module = record._modules["model"]
    for name in dotted.split("."):
        module = module._modules[name]
    return module


def test_a_tensor_of_the_wrong_shape_is_named(reference_modules, tmp_path):
    record = model_record(build_model("gelan-t", num_classes=2).eval(), reference_modules)
    conv = layer_of(record, "4.cv1.conv")
    conv._parameters["weight"] = torch.zeros(8, 8, 1, 1, dtype=torch.half)
    path = tmp_path / "misfit.pt"
    torch.save({"model": record}, path)
    with pytest.raises(
        ReferenceLayoutError,
        match=r"state does not fit gelan-t.*layer 4.*cv1\.conv\.weight has shape \(8, 8, 1, 1\)",
    ):
        load_reference_checkpoint(path)


def test_a_missing_tensor_is_named(reference_modules, tmp_path):
    record = model_record(build_model("gelan-t", num_classes=2).eval(), reference_modules)
    del layer_of(record, "0.bn")._buffers["running_var"]
    path = tmp_path / "missing.pt"
    torch.save({"model": record}, path)
    with pytest.raises(ReferenceLayoutError, match=r"layer 0 .*missing bn\.running_var"):
        load_reference_checkpoint(path)


def test_a_convolution_with_another_stride_does_not_fit(reference_modules, tmp_path):
    record = model_record(build_model("gelan-t", num_classes=2).eval(), reference_modules)
    layer_of(record, "0.conv").stride = (1, 1)
    path = tmp_path / "stride.pt"
    torch.save({"model": record}, path)
    with pytest.raises(ReferenceLayoutError, match=r"layer 0 .*conv\.stride is \(1, 1\), expected \(2, 2\)"):
        load_reference_checkpoint(path)


def test_names_from_the_reference_modules_are_recorded_never_called(reference_modules, tmp_path):
    marker = tmp_path / "marker"

    def touch(path: str) -> None:
        Path(path).touch()

    touch.__module__, touch.__qualname__ = "models.common", "touch"
    sys.modules["models.common"].touch = touch
    path = tmp_path / "calls.pt"
    torch.save({"model": CallsReferenceFunction(touch, marker)}, path)
    record = load_inert(path)["model"]
    assert (type(record).pickled_class, record.args) == ("models.common.touch", (str(marker),))
    assert not marker.exists()


class CallsReferenceFunction:
    """Unpickling this calls ``function(marker)``."""

    def __init__(self, function, marker: Path) -> None:
        self.function, self.marker = function, marker

    def __reduce__(self):
        return self.function, (str(self.marker),)
