"""convert() on the Ghost modules users run (issue 16), built from the real packages' configs (no
weight downloads): timm's ghostnet_100, ghostnetv2_100 (the attention gate), ghostnetv3_100 after
re-parameterization, Ultralytics' yolov8n-ghost (GhostConv, C3Ghost), and YOLOv5's GhostConv as its
source writes it. Every Ghost module converts, keeps its state_dict keys (checkpoints load strictly
both ways), and computes what the original computes; fuse() and reparameterize_model still work."""
import copy
import warnings

import pytest
import torch
from helpers import DEVICE, randomize, rel_err
from torch import nn

import ghost_kernels as gk

timm = pytest.importorskip("timm")


def timm_model(name):
    model = randomize(timm.create_model(name, pretrained=False, num_classes=10)).to(DEVICE).eval()
    if name == "ghostnetv3_100":
        from timm.utils.model import reparameterize_model
        model = reparameterize_model(model)
    return model


def converted(model, backend="auto"):
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # every Ghost module converts: no warning
        out, report = gk.convert(model, backend=backend, return_report=True)
    assert out is model and not report.skipped, report.skipped
    return report


@pytest.mark.parametrize("name,kind", [("ghostnet_100", "GhostModule"), ("ghostnetv2_100", "FusedGhostV2"),
                                       ("ghostnetv3_100", "FusedGhostV3")])
def test_timm_models_convert_every_ghost_module(name, kind):
    """32 of 32 Ghost modules convert (before: 18 of ghostnetv2's, none of ghostnetv3's); keys and
    outputs unchanged (auto on a CPU runs each module's own PyTorch path: exact)."""
    model = timm_model(name)
    original = copy.deepcopy(model)
    report = converted(model)
    assert len(report.converted) == 32
    fused = [m for m in model.modules() if isinstance(m, gk.FusedGhost)]
    assert len(fused) == 32 and sum(type(m).__name__ == kind for m in fused) >= 14
    assert list(model.state_dict()) == list(original.state_dict())
    model.load_state_dict(original.state_dict(), strict=True)
    original.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 40, 56, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)


def test_ghostnetv3_training_form_is_reported_then_converts_after_reparameterization():
    """GhostNetV3's training form is reported with the fix; re-parameterizing the converted model
    (timm's reparameterize_model replaces children that have fuse() and calls reparameterize())
    leaves modules convert() then converts."""
    from timm.utils.model import reparameterize_model
    model = randomize(timm.create_model("ghostnetv3_100", pretrained=False, num_classes=10)).eval()
    with pytest.warns(UserWarning, match="re-parameterize it first"):
        _, report = gk.convert(model, return_report=True)
    assert len(report.skipped) == 32 and not report.converted
    model = reparameterize_model(model)
    assert len(converted(model).converted) == 32
    again = reparameterize_model(model)        # on a converted model: still works, nothing to do
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


ultralytics = pytest.importorskip("ultralytics")


def yolo(backend="auto"):
    from ultralytics.nn.tasks import DetectionModel
    torch.manual_seed(0)
    model = DetectionModel("yolov8n-ghost.yaml", verbose=False)
    return randomize(model).to(DEVICE).eval()


def detections(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def test_yolov8n_ghost_converts_all_26_ghostconvs_and_fuse_still_works():
    """yolov8n-ghost.yaml: 26 GhostConv (before: 0, silently), SiLU, 5x5 cheap convs, 3x3 stride-2
    primary convs; Ultralytics' bookkeeping (f, i, type) and keys kept; model.fuse() on the converted
    model fuses the Conv layers inside (biased convs, no BN) and still equals the original's fuse()."""
    model = yolo()
    original = copy.deepcopy(model)
    assert sum(type(m).__name__ == "GhostConv" for m in original.modules()) == 26
    report = converted(model)
    assert len(report.converted) == 26
    specs = {m.spec for m in model.modules() if isinstance(m, gk.FusedGhost)}
    assert {s.act for s in specs} == {"silu", "none"} and {s.dw_size for s in specs} == {5}
    assert any(s.kernel_size == 3 and s.stride == 2 for s in specs)
    top = [m for m in model.model if isinstance(m, gk.FusedGhost)]
    assert top and all(hasattr(m, "f") and hasattr(m, "i") and m.type for m in top)
    assert list(model.state_dict()) == list(original.state_dict())
    model.load_state_dict(original.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 96, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(detections(model(x)), detections(original(x)), rtol=0, atol=0)
        model.fuse(verbose=False)
        original.fuse(verbose=False)
        assert not any(hasattr(m, "bn") for m in model.modules() if type(m).__name__ == "Conv")
        fused_specs = [m.params() for m in model.modules() if isinstance(m, gk.FusedGhost)]
        assert all(p.bn1 is None and p.b1 is not None for p in fused_specs)
        torch.testing.assert_close(detections(model(x)), detections(original(x)), rtol=0, atol=0)


class _V5Conv(nn.Module):
    """YOLOv5's ``Conv`` (models/common.py), as its source writes it."""

    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class GhostConv(nn.Module):
    """YOLOv5's ``GhostConv`` (models/common.py), as its source writes it."""

    def __init__(self, c1, c2, k=1, s=1, g=1, act=True):
        super().__init__()
        c_ = c2 // 2
        self.cv1 = _V5Conv(c1, c_, k, s, None, g, act=act)
        self.cv2 = _V5Conv(c_, c_, 5, 1, None, c_, act=act)

    def forward(self, x):
        y = self.cv1(x)
        return torch.cat((y, self.cv2(y)), 1)


def test_yolov5_ghostconv_forms():
    """YOLOv5's GhostConv: SiLU, act=False (identity), an odd c2 (c2 - 1 channels, no slice), a
    grouped primary conv (not a Ghost module: reported)."""
    model = randomize(nn.Sequential(GhostConv(8, 16, 3, 2), GhostConv(16, 15, act=False), GhostConv(14, 8)))
    model.eval().to(DEVICE)
    original = copy.deepcopy(model)
    report = converted(model)
    assert report.converted == ["0", "1", "2"] and model[1].spec.act == "none" and model[1].spec.oup == 14
    x = torch.randn(2, 8, 9, 7, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)
    grouped = GhostConv(8, 16, g=2)
    with pytest.warns(UserWarning, match="primary conv is not a square, dense"):
        assert gk.convert(nn.Sequential(grouped))[0] is grouped


@pytest.mark.parametrize("name,layout", [("yolov8n-ghost", "nchw"), ("yolov8n-ghost-fused", "channels_last"),
                                         ("ghostnetv3_100", "channels_last")])
def test_fused_kernels_run_the_real_models(name, layout):
    """backend="triton" (the Triton kernels; the interpreter on a CPU) on the real models, eval mode, a
    non-square input: SiLU and identity GhostConvs with 5x5 cheap convs, in both Ultralytics forms (BN;
    after fuse(): biased convs, no BN) and GhostNetV3's deployed modules (biased convs, no BN; 14 with
    the DFC attention gate of GhostNetV2, multiplied in triton_band's stores), within 2x eager's error
    against float64; Ultralytics' downsampling GhostConvs (3x3 stride-2 primary convs) on triton_two_pass's
    implicit GEMM."""
    model = timm_model(name) if name.startswith("ghostnet") else yolo()   # 26 GhostConv or 32 modules
    if name.endswith("-fused"):
        model.fuse(verbose=False)
    original = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = gk.convert(model, backend="triton", return_report=True)
    assert len(report.converted) == (26 if name.startswith("yolo") else 32) and not report.skipped, report.skipped
    # what backend="triton" runs in inference only (its training ops refuse): YOLO's six 3x3 stride-2
    # GhostConvs; every deployed module (no BatchNorm), said in the report's summary
    untrainable = {"yolov8n-ghost": 6, "yolov8n-ghost-fused": 26, "ghostnetv3_100": 32}[name]
    assert len(report.inference_only) == untrainable, report.inference_only
    reason = "without a BatchNorm" if untrainable > 6 else "kernel_size=3"
    assert all(reason in r for r in report.inference_only.values()) and "inference only" in report.summary()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    size = (64, 96) if name.startswith("yolo") else (36, 52)   # YOLO: multiples of 32; V2: >= 2x2 at the end
    x = torch.randn(1, 3, *size, device=DEVICE).contiguous(memory_format=fmt)
    with torch.no_grad():
        out, eager = detections(model(x)), detections(original(x))
        ref = detections(copy.deepcopy(original).double()(x.double()))
    assert rel_err(out, ref) <= 2 * rel_err(eager, ref) + 1e-6, (rel_err(out, ref), rel_err(eager, ref))
