"""The static performance budget of the CUDA kernels (scripts/sass_budget.py), read from the SASS
of this build for sm_90: a property of the compiled code, deterministic, no GPU needed.

Fails when a fast-path kernel (the channels_last fp16/bf16 3x3 / 5x5 / 7x7 and the NCHW fp32 3x3
forward window kernels) spends more thread-instructions per output element than its budget,
spills, keeps fewer than 8 warps resident per SM, or (channels_last fp16/bf16 3x3) makes a global
load or store narrower than 128 bits; and when the channels_last 3x3 fallback (C % 8 != 0,
unaligned) breaks 3x its class's budget.
"""
import importlib.util
import sys
from pathlib import Path

import pytest

import fastdw

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sass_budget", ROOT / "scripts" / "sass_budget.py")
sb = importlib.util.module_from_spec(_spec)
sys.modules["sass_budget"] = sb  # dataclasses look their module up there
_spec.loader.exec_module(sb)


def _report():
    info = fastdw.build_info()
    if not info.get("with_cuda") or not any(a.startswith("9.0") for a in info.get("cuda_archs", [])):
        pytest.skip(f"no sm_90 code in this build ({info.get('cuda_archs')})")
    try:
        sb.find_tools()
    except SystemExit as e:
        pytest.skip(str(e))
    # one pass over the cubins for the forward and the fused backward kernels
    return sb.report(fastdw._C.__file__, "90", r"Fwd(Win|Nchw|ScalarWin|General|Vec)<|BwdFused<")


@pytest.fixture(scope="module")
def all_kernels():
    return _report()


@pytest.fixture(scope="module")
def kernels(all_kernels):
    return [k for k in all_kernels if k.tag.startswith("Fwd")]


@pytest.fixture(scope="module")
def bwd_kernels(all_kernels):
    return [k for k in all_kernels if k.tag == "BwdFused"]


def test_fast_paths_are_there(kernels):
    names = {k.kernel for k in kernels}
    for want in ("FwdWin<Half, relu6, 3, 1, 16, 2, false>", "FwdWin<BFloat16, hardswish, 3, 2, 16, 1, false>",
                 "FwdNchw<float, relu6, 3, 1, 16, 4, false>", "FwdNchw<float, silu, 3, 2, 8, 4, false>",
                 "FwdScalarWin<Half, 5, 1, 8, 8, true, false, false>",
                 "FwdScalarWin<BFloat16, 7, 1, 8, 8, true, true, false>"):
        assert want in names, sorted(names)


def test_fast_paths_meet_their_budget(kernels):
    fast = [k for k in kernels if k.fast_path]
    assert len(fast) >= 40, [k.kernel for k in fast]
    bad = [f"{k.kernel}: {k.note}" for k in fast if not k.ok]
    assert not bad, "\n".join(bad)
    # the channels_last fp16/bf16 3x3 stride-1 kernels with a cheap activation: <= 20 per output
    for k in fast:
        if k.tag == "FwdWin" and k.S == 1 and k.act in ("none", "relu", "relu6"):
            assert k.instr_per_output <= 20, (k.kernel, k.instr_per_output)
            assert k.load_bits == [128] and k.store_bits == [128], (k.kernel, k.load_bits, k.store_bits)


def test_fallbacks_within_three_times_their_class(kernels):
    """C % vec != 0 and unaligned views (3x3 channels_last) and dilation (any K) take FwdScalarWin:
    held to 3x the fast budget of their class."""
    fallbacks = [k for k in kernels if k.tag == "FwdScalarWin" and k.budget is not None and not k.fast_path]
    names = {k.kernel for k in fallbacks}
    for want in ("FwdScalarWin<Half, 3, 1, 8, 8, true, false, false>",  # C % 8 != 0 / unaligned
                 "FwdScalarWin<Half, 3, 1, 8, 8, true, false, true>",  # dilated, every activation
                 "FwdScalarWin<float, 3, 2, 8, 4, false, false, true>",  # NCHW fp32 dilated
                 "FwdScalarWin<BFloat16, 7, 1, 8, 8, true, false, true>"):
        assert want in names, sorted(names)
    bad = [f"{k.kernel}: {k.note}" for k in fallbacks if not k.ok]
    assert not bad, "\n".join(bad)


def test_no_forward_kernel_spills(kernels):
    spilling = [f"{k.kernel}: {k.spill_instr} STL/LDL" for k in kernels if k.spill_instr and k.tag in sb.FAST_TAGS]
    assert not spilling, spilling


def test_budget_counting_is_not_vacuous():
    """The path analysis on a hand-made function: an interior path with 2 FFMA and one 16-byte
    store of fp16 (8 outputs), a border path with 4 extra instructions; the cheaper path counts."""
    sass = "\n".join([
        "        Function : k",
        "        /*0000*/                   ISETP.GE.AND P0, PT, R0, RZ, PT ;",
        "        /*0010*/               @P0 BRA 0x50 ;",
        "        /*0020*/                   IADD3 R1, R1, 0x1, RZ ;",
        "        /*0030*/                   IADD3 R1, R1, 0x1, RZ ;",
        "        /*0040*/                   IADD3 R1, R1, 0x1, RZ ;",
        "        /*0050*/                   FFMA R2, R3, R4, R5 ;",
        "        /*0060*/                   FFMA R2, R3, R4, R2 ;",
        "        /*0070*/                   STG.E.128 desc[UR4][R6.64], R8 ;",
        "        /*0080*/                   EXIT ;",
        "        /*0090*/                   BRA 0x90 ;",
    ])
    f = sb.parse_sass(sass)["k"]
    total, n_ins, n_out, est, ld, st, sp = sb.analyse(f, 2, None)
    assert total == 9 and n_out == 8 and n_ins == 6 and st == [128] and not est


def test_loop_counting_takes_the_steady_state():
    """A loop is counted one iteration at a time on its best path: of two store loops (a
    bounds-checked copy at 0x00-0x70 with one extra instruction, an interior one at 0x80-0xf0) the
    cheaper per output; inside it the arm that stores (the skipped store is not the steady state)
    and, among the storing paths, not the slow-path arm with its CALL; the loop's exit not taken."""
    sass = "\n".join([
        "        Function : k",
        "        /*0000*/                   FFMA R2, R3, R4, R5 ;",
        "        /*0010*/                   IADD3 R1, R1, 0x1, RZ ;",
        "        /*0020*/                   FFMA R2, R3, R4, R2 ;",
        "        /*0030*/                   STG.E desc[UR4][R6.64], R2 ;",
        "        /*0040*/                   ISETP.GE.AND P0, PT, R1, RZ, PT ;",
        "        /*0050*/               @P0 BRA 0x70 ;",
        "        /*0060*/                   FFMA R2, R3, R4, R2 ;",
        "        /*0070*/               @P1 BRA 0x0 ;",
        "        /*0080*/                   FFMA R2, R3, R4, R5 ;",
        "        /*0090*/               @P2 BRA 0xc0 ;",
        "        /*00a0*/                   FCHK P3, R2, R3 ;",
        "        /*00b0*/                   CALL.REL.NOINC 0x200 ;",
        "        /*00c0*/               @P3 BRA 0xe0 ;",
        "        /*00d0*/                   STG.E desc[UR4][R6.64], R2 ;",
        "        /*00e0*/               @P4 BRA 0x300 ;",
        "        /*00f0*/               @P1 BRA 0x80 ;",
        "        /*0100*/                   EXIT ;",
        "        /*0110*/                   BRA 0x110 ;",
    ])
    f = sb.parse_sass(sass)["k"]
    total, n_ins, n_out, est, ld, st, sp = sb.analyse(f, 4, None)
    # interior loop: FFMA, @P2 BRA (taken past the slow path), @P3 BRA (falls through), STG,
    # @P4 BRA (exit, not taken), the back branch: 6 instructions for one fp32 output
    assert total == 17 and n_out == 1 and n_ins == 6 and st == [32] and not est
    assert sb._LAST_PATH == ["FFMA", "BRA", "BRA", "STG.E", "BRA", "BRA"]


def test_fused_backward_kernels(bwd_kernels):
    """The fused 3x3 backward (issue 15), counted per dx element over an iteration of its row
    loop: every variant (3 dtypes x stride 1 / 2 x both layouts x ReLU family / smooth
    activations x inference / training) is there, is a loop (not a tile unrolled into tens of
    thousands of instructions), keeps 8+ warps per SM and does not spill in its body, except a
    ratchet on the channels_last kernels (at most 8 bytes, 4 STL/LDL per thread of 64 or 128 dx
    elements). Held to the issue's budget where it is met today: every stride-2 kernel (<= 60 per
    dx element, training 63), every fp32 kernel (<= 60 / 63) and the NCHW fp16/bf16 stride-1
    ReLU family; the others (NCHW fp16/bf16 hardswish / silu ~69 against 60, channels_last
    fp16/bf16 stride 1 ~55-76 against 40) are reported by scripts/sass_budget.py and not yet
    held (issue 15 stays open)."""
    assert len(bwd_kernels) == 48, sorted(k.kernel for k in bwd_kernels)
    for k in bwd_kernels:
        dtype, K, S, cl, smooth, train = k.kernel[k.kernel.index("<") + 1:-1].split(", ")
        assert (K, S) == (str(k.K), str(k.S)) and cl in ("true", "false"), k.kernel
        cl = cl == "true"
        assert k.instr_per_output is not None and k.budget is not None, k.kernel
        body_spills = k.spill_instr - k.spill_instr_sub  # (the fp32 division's slow-path subroutine aside)
        if cl:
            assert body_spills <= 4 and k.spill_bytes <= 8, (k.kernel, body_spills, k.spill_bytes)
        else:
            assert body_spills == 0, (k.kernel, body_spills)
        if k.S == 2 or dtype == "float" or (not cl and smooth == "false"):
            assert k.instr_per_output <= k.budget, (k.kernel, k.instr_per_output, k.budget)
        assert k.instr_total < 16000, (k.kernel, k.instr_total)
        assert k.warps_per_sm >= 8, (k.kernel, k.warps_per_sm)


def test_triton_kernels_reported():
    """`--triton-only --quick`: the Triton forward, gu and dx kernels compiled for sm_90 by Triton
    itself (no GPU), in the same JSON rows as the CUDA kernels with names prefixed triton:, their
    registers, spills and instructions per output, the forward and the backward (gu + dx) rows
    carrying the CUDA budgets times 1.25. The forward and backward rows (the first config of each
    list) meet their budgets without spilling; the rest is reported (--check-triton holds every
    row)."""
    import json
    import os
    import subprocess
    import tempfile

    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton has no NVIDIA backend (ptxas)")
    try:
        sb.find_tools()
    except SystemExit as e:
        pytest.skip(str(e))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "t.json"
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "sass_budget.py"), "--triton-only", "--quick",
                            "--json", str(out), "--check"], capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]  # --check alone does not hold Triton rows
        rows = json.loads(out.read_text())
    assert rows and all(k["kernel"].startswith("triton:") and k["arch"] == "sm_90" for k in rows)
    fwd = {k["kernel"]: k for k in rows if k["tag"] == "triton_fwd"}
    assert {(k["dtype"], k["K"], k["S"], k["budget"]) for k in fwd.values()} == {("fp16", 3, 1, 25.0),
                                                                                  ("fp32", 3, 1, 43.75)}
    for k in fwd.values():  # the row-streaming forward
        assert k["ok"] and k["spill_bytes"] == 0 and k["instr_per_output"] <= k["budget"], k
    assert {k["tag"] for k in rows} == {"triton_fwd", "triton_gu", "triton_dx", "triton_bwd"}
    bwd = [k for k in rows if k["tag"] == "triton_bwd"]
    assert sorted(k["budget"] for k in bwd) == [50.0, 75.0]
    for k in bwd:  # the band backward: gu + dx per dx element
        assert k["ok"] and k["spill_bytes"] == 0 and k["instr_per_output"] <= k["budget"], k
    for k in rows:
        assert k["instr_per_output"] and k["instr_per_output"] > 0, k
        assert k["warps_per_sm"] > 0 and (k["tag"] == "triton_bwd" or k["registers"] > 0), k
        assert (k["ok"] is None) == (k["budget"] is None), k
    gu = next(k for k in rows if k["tag"] == "triton_gu" and k["dtype"] == "fp16")
    dx = next(k for k in rows if k["tag"] == "triton_dx" and k["dtype"] == "fp16")
    b = next(k for k in bwd if k["dtype"] == "fp16")
    assert b["instr_per_output"] == pytest.approx(gu["instr_per_output"] + dx["instr_per_output"], abs=0.02)
