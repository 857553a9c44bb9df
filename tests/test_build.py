"""Build facts, backend selection and the layer registry."""
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastdw
from fastdw import layers


def _nvcc():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    cand = os.path.join(home, "bin", "nvcc")
    return cand if os.path.exists(cand) else shutil.which("nvcc")


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    # the nvidia-cuda-cuobjdump wheel (a test dependency) puts it under site-packages
    for base in sys.path:
        hits = glob.glob(os.path.join(base, "nvidia", "cu*", "bin", "cuobjdump"))
        if hits:
            return hits[0]
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    cand = os.path.join(home, "bin", "cuobjdump")
    return cand if os.path.exists(cand) else None


def test_extension_imports_and_reports():
    assert fastdw.HAS_EXT, fastdw.build_info()
    info = fastdw.build_info()
    assert info["version"] == fastdw.__version__
    assert info["torch_version"] == torch.__version__
    assert "cpu" in info["backends"]
    assert "cpu" in fastdw.available_backends()


CUDA_EXPECTED = (_nvcc() is not None and torch.version.cuda is not None
                 and os.environ.get("FASTDW_SKIP_CUDA_BUILD", "0") in ("", "0"))


@pytest.mark.skipif(not CUDA_EXPECTED, reason="no nvcc or a CPU build of torch: CPU-only build expected")
def test_cuda_extension_was_not_silently_skipped():
    info = fastdw.build_info()
    assert info["with_cuda"], f"nvcc is at {_nvcc()} but fastdw was built without CUDA: {info}"
    assert info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]
    archs = set(info["cuda_archs"])
    from fastdw import _build_config as bc

    # an explicit arch list at build time (scripts/device_build.sh: 9.0 only) replaces the default
    wanted = os.environ.get("FASTDW_CUDA_ARCHS") or getattr(bc, "CUDA_ARCHS_REQUESTED", None)
    if not wanted and not torch.cuda.is_available():
        assert {"8.0", "9.0"} <= archs, archs


@pytest.mark.skipif(not CUDA_EXPECTED, reason="CPU-only build")
def test_binary_holds_sass_for_every_compiled_arch():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    so = Path(fastdw._C.__file__)
    out = subprocess.run([tool, "--list-elf", str(so)], capture_output=True, text=True).stdout
    sass = set(re.findall(r"\.sm_(\d+)[a-z]?\.cubin", out))
    for arch in fastdw.build_info()["cuda_archs"]:
        num = arch.replace("+PTX", "").replace(".", "")
        assert num in sass, f"no SASS for sm_{num} in {so.name}: {out}"


def test_backend_selection_on_cpu(monkeypatch):
    x = torch.randn(1, 4, 6, 6)
    w = torch.randn(4, 1, 3, 3)
    ref = fastdw.dwconv_bn_act(x, w, backend="cpu")
    torch.testing.assert_close(fastdw.dwconv_bn_act(x, w), ref)
    assert fastdw.resolve_backend("auto", x.device) == "cpu"
    monkeypatch.setenv("FASTDW_BACKEND", "cpu")
    torch.testing.assert_close(fastdw.dwconv_bn_act(x, w), ref)
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        fastdw.dwconv_bn_act(x, w, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastdw.dwconv_bn_act(x, w, backend="cudnn")
    monkeypatch.setenv("FASTDW_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTDW_BACKEND must be one of"):
        fastdw.dwconv_bn_act(x, w)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU backend")
def test_triton_backend_unavailable_is_a_clear_error():
    x = torch.randn(1, 4, 6, 6)
    w = torch.randn(4, 1, 3, 3)
    if "triton" in fastdw.available_backends():
        pytest.skip("the Triton backend is available here")
    with pytest.raises(RuntimeError, match="backend='triton'"):
        fastdw.dwconv_bn_act(x, w, backend="triton")


@pytest.mark.parametrize("net", sorted(layers.NETWORKS))
def test_layer_registry_matches_the_real_networks(net):
    """torchvision's networks; Xception from timm (legacy_xception, the paper's network, 299x299)."""
    if net == "xception":
        timm = pytest.importorskip("timm")
        model = timm.create_model("legacy_xception", pretrained=False)
    else:
        torchvision = pytest.importorskip("torchvision")
        model = getattr(torchvision.models, net)()
    assert layers.extract_dw_layers(model, net, layers.INPUT_SIZE[net]) == layers.NETWORKS[net]


def test_unique_layers():
    u = layers.unique_layers(layers.XCEPTION)
    assert len(layers.XCEPTION) == 34 and len(u) == 9
    assert sum(1 for L in layers.XCEPTION if (L.C, L.H) == (728, 19)) == 26
    assert layers.unique_layers(layers.MOBILENET_V2)[0] == layers.MOBILENET_V2[0]


def test_mobilenet_v2_has_17_depthwise_layers():
    assert len(layers.MOBILENET_V2) == 17
    assert all(layer.k == 3 and layer.act == "relu6" for layer in layers.MOBILENET_V2)


def test_source_list_names_every_source():
    """csrc/sources.txt (read by setup.py and CMakeLists.txt) lists every .cpp / .cu in csrc."""
    root = Path(__file__).resolve().parents[1]
    listed = set()
    for line in (root / "csrc" / "sources.txt").read_text().splitlines():
        parts = line.split("#", 1)[0].split()
        if parts:
            assert (root / "csrc" / parts[0]).exists(), f"sources.txt names a missing file {parts[0]}"
            listed.add(parts[0])
    on_disk = {str(p.relative_to(root / "csrc")) for ext in ("*.cpp", "*.cu") for p in (root / "csrc").rglob(ext)}
    assert listed == on_disk, f"not listed: {sorted(on_disk - listed)}; listed but absent: {sorted(listed - on_disk)}"


def test_import_under_another_torch_is_a_clear_error(tmp_path):
    """A binary built for another torch major.minor: `import fastdw` raises an ImportError that says
    so (not an undefined-symbol error from loading _C)."""
    root = Path(__file__).resolve().parents[1]
    pkg = tmp_path / "fastdw"
    shutil.copytree(root / "fastdw", pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__", "_build_config.py"))
    (pkg / "_build_config.py").write_text("TORCH_VERSION = '1.13.1+cu117'\nCUDA_VERSION = '11.7'\n"
                                          "CUDA_ARCHS = ['8.0']\nVERSION = '0.1.0+cu117torch1.13'\n")
    r = subprocess.run([sys.executable, "-c", "import fastdw"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0
    assert "ImportError: fastdw" in r.stderr and "built against torch 1.13.1+cu117" in r.stderr, r.stderr[-2000:]
    assert "undefined symbol" not in r.stderr


def test_import_under_another_torch_build_is_a_clear_error(tmp_path):
    """The same torch version number from another commit (a nightly, a local build) is refused too:
    the build records torch's git version."""
    root = Path(__file__).resolve().parents[1]
    pkg = tmp_path / "fastdw"
    shutil.copytree(root / "fastdw", pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__", "_build_config.py"))
    (pkg / "_build_config.py").write_text(f"TORCH_VERSION = {torch.__version__!r}\n"
                                          "TORCH_GIT_VERSION = '0123456789abcdef0123456789abcdef01234567'\n"
                                          "CUDA_VERSION = None\nCUDA_ARCHS = []\nVERSION = '0.1.0'\n")
    r = subprocess.run([sys.executable, "-c", "import fastdw"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0
    assert "ImportError: fastdw" in r.stderr and "(git 0123456789ab)" in r.stderr, r.stderr[-2000:]
    assert "another build of torch" in r.stderr


def test_build_records_the_torch_build():
    from fastdw import _build_config as bc

    assert bc.TORCH_VERSION == torch.__version__
    assert bc.TORCH_GIT_VERSION == torch.version.git_version


def test_arch_compatibility_rule():
    from fastdw.ops import arch_runs

    wheel = ["8.0", "8.6", "8.9", "9.0+PTX"]
    assert arch_runs(wheel, (8, 0)) and arch_runs(wheel, (8, 7)) and arch_runs(wheel, (9, 0))
    assert arch_runs(wheel, (10, 0)) and arch_runs(wheel, (12, 0))  # through the PTX
    assert not arch_runs(["8.0", "9.0"], (10, 0)) and not arch_runs(wheel, (7, 5))
    assert not arch_runs([], (9, 0)) and not arch_runs(["8.6"], (8, 0))
