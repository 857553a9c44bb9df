"""The static performance report of fastdw's CUDA kernels, read from their SASS (no GPU needed).

    python scripts/sass_budget.py                  # table for sm_90, every kernel of the built extension
    python scripts/sass_budget.py --json out.json  # [{"kernel", "arch", "registers", "spill_bytes", ...}]
    python scripts/sass_budget.py --check          # exit 1 when a budgeted kernel breaks its budget or spills
    python scripts/sass_budget.py --so PATH --arch 90 --filter Fwd
    python scripts/sass_budget.py --triton         # and the Triton kernels (compiled here by Triton, minutes)
    python scripts/sass_budget.py --triton-only [--quick]

Why instructions decide the speed (DESIGN.md, "the static budget"): an H200 SM moves about 16.5
bytes per clock and issues at most 128 thread-instructions per clock, so a kernel moving B bytes per
output element reaches copy speed only if it spends at most 128 * 16.5 / B thread-instructions per
element (fp16 stride-1 forward, B = 4: about 31). The budgets below sit well under those ceilings.

For every kernel instantiation in the extension's sm_XX cubins (cuobjdump and nvdisasm: Triton's
bundled copies, or the CUDA toolkit's): registers, stack / local bytes and spill instructions
(STL/LDL), threads per block (the launch bound), resident warps per SM (registers, threads and
shared memory against sm_90's limits), the widths of its global loads and stores, and the
steady-state thread-instructions per output element:
  * the region that writes outputs: one iteration of the innermost loop holding global stores
    (of several such loops, an interior copy and a bounds-checked one say, the cheapest per
    output), or the whole function when no loop holds one (fully unrolled bodies);
  * its instruction count on its best path: NOPs and the final self-branch excluded, the path
    storing the most (every output in bounds) and among those the fewest instructions (a slow
    path such as IEEE division's special cases is not taken; a CALL counts as one instruction);
    a loop body holding other loops is counted whole, the nested loops weighted by an estimated
    trip count (the kernel size K from the kernel's name; marked "est");
  * divided by the output elements the region stores (store bytes / the output element size).
Budgets (instructions per output element) come from issue 14 and apply to the kernels named in
BUDGETS; a fallback path of a class (C % vec != 0, unaligned views, dilation) gets 3x its class's
fast budget. The generic kernels (shapes outside the specialised set) are reported without a budget.

The fused backward (BwdFused, issue 15) is counted per dx element over one iteration of its row
loop (K q rows with their dx rows; the per-tile sums, K*K + 2 fp32 values, are written after the
loop, and subtracted from the stores when a kernel has no loop). That is the steady state of a
long tile: a tile of TO rows also computes the halo's q rows (2 per 16 at stride 1, 1 per 8 at
stride 2) and sets up its window, about +6 instructions per dx element at stride 1. Budgets:
fp16/bf16 channels_last 3x3 stride 1 <= 40, stride 2 <= 60; fp32 NCHW 3x3 stride 1 <= 60 (the
other layout / dtype pairs: the same numbers as their stride's class). The training variant adds
two FFMA per q (the batch-statistics terms): +3. The general backward kernels (BwdGu, BwdDx,
BwdPartial, BwdFinish) and the finish stages are reported without a budget.

The Triton kernels (--triton, issue 16): each autotune config of the forward, gu and dx kernels
for the budgeted classes, compiled for the arch by Triton's own compiler and ptxas as the JIT
would specialize a MobileNet-like call, counted the same way (rows named triton:...), with the
CUDA budgets times 1.25; the backward's budget is held by a row summing gu (per output / S^2) and
dx (per dx element). Reported; --check holds them only with --check-triton.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]

# sm_90 limits (H100 / H200)
SM_REGS, SM_WARPS, SM_BLOCKS, SM_SMEM = 65536, 64, 32, 228 * 1024

_ACT_NAMES = {0: "none", 1: "relu", 2: "relu6", 3: "hardswish", 4: "silu"}
_ELEM = {"c10::Half": 2, "c10::BFloat16": 2, "float": 4, "double": 8}


def find_tools() -> Tuple[str, str]:
    """(cuobjdump, directory holding nvdisasm)."""
    cands = []
    try:
        import triton  # noqa: F401

        cands.append(os.path.join(os.path.dirname(sys.modules["triton"].__file__), "backends", "nvidia", "bin"))
    except ImportError:
        pass
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    cands += [os.path.join(home, "bin")] + os.environ.get("PATH", "").split(os.pathsep)
    for d in cands:
        if os.path.exists(os.path.join(d, "cuobjdump")) and os.path.exists(os.path.join(d, "nvdisasm")):
            return os.path.join(d, "cuobjdump"), d
    raise SystemExit("sass_budget: needs cuobjdump and nvdisasm (Triton ships both; or a CUDA toolkit with them)")


def run(cmd: List[str], env=None) -> str:
    # through a file: cuobjdump prints hundreds of MB, which a pipe hands over in small reads
    with tempfile.TemporaryFile() as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, check=True, env=env)
        f.seek(0)
        return f.read().decode()


def demangle(names: List[str]) -> Dict[str, str]:
    if not names:
        return {}
    tool = shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


@dataclass
class Kernel:
    kernel: str
    arch: str
    mangled: str
    tag: str = ""
    dtype: str = ""
    act: str = ""
    K: Optional[int] = None
    S: Optional[int] = None
    registers: int = 0
    stack_bytes: int = 0
    local_bytes: int = 0
    spill_bytes: int = 0  # local (stack) bytes when the function spills: STL/LDL present
    spill_instr: int = 0
    spill_instr_sub: int = 0  # of those, in CALLed subroutines (the IEEE fp32 division's slow path)
    threads_per_block: int = 0
    shared_bytes: int = 0
    warps_per_sm: int = 0
    load_bits: List[int] = field(default_factory=list)
    store_bits: List[int] = field(default_factory=list)
    instr_total: int = 0
    region_instr: float = 0.0
    outputs_per_region: float = 0.0
    instr_per_output: Optional[float] = None
    estimated: bool = False
    budget: Optional[float] = None
    fast_path: bool = False
    ok: Optional[bool] = None
    note: str = ""


_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(text: str) -> Dict[str, List[Tuple[int, str]]]:
    """{mangled function name: [(address, instruction text)]}."""
    funcs: Dict[str, List[Tuple[int, str]]] = {}
    cur = None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line) if "Function : " in line else None
        if m:
            cur = m.group(1)
            funcs[cur] = []
            continue
        m = _INSTR.match(line)
        if m and cur is not None:
            funcs[cur].append((int(m.group(1), 16), m.group(2)))
    return funcs


def _opcode(ins: str) -> str:
    s = ins.strip()
    if s.startswith("@"):
        s = s.split(None, 1)[1] if " " in s else ""
    return s.split()[0] if s else ""


def _width(op: str) -> int:
    for w in (128, 64):
        if f".{w}" in op:
            return w
    if ".U8" in op or ".S8" in op:
        return 8
    if ".U16" in op or ".S16" in op:
        return 16
    return 32


def analyse(instrs: List[Tuple[int, str]], elem_bytes: int, K: Optional[int]):
    """(total, region count, outputs per region, estimated?, load widths, store widths, spill instrs)."""
    # drop the trailing self-branch and NOP padding
    body = [(a, i) for a, i in instrs if _opcode(i) != "NOP"]
    while body and _opcode(body[-1][1]) == "BRA" and body[-1][1].rstrip().endswith(hex(body[-1][0])):
        body.pop()
    addrs = [a for a, _ in body]
    ops = [_opcode(i) for _, i in body]
    loops = []  # (start index, end index) of backward branches
    for idx, (a, ins) in enumerate(body):
        if ops[idx] == "BRA" or ops[idx].startswith("BRA."):
            m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", ins)
            tgt = None
            if m and m.group(1):
                tgt = int(m.group(1), 16)
            if tgt is not None and tgt <= a:
                start = next((j for j, x in enumerate(addrs) if x >= tgt), idx)
                loops.append((start, idx))
    is_store = [op.startswith("STG") or op in ("ST.E", "ST") or op.startswith("ST.E") for op in ops]
    loads = sorted({_width(op) for op in ops if op.startswith("LDG") or op.startswith("LD.E")})
    stores = sorted({_width(op) for op, st in zip(ops, is_store) if st})
    spills = sum(1 for op in ops if op.startswith("STL") or op.startswith("LDL"))
    _SUB_SPILLS[0] = 0
    calls = [int(m.group(1), 16) for _, i in body for m in [re.search(r"\bCALL\.REL\S*\s+0x([0-9a-f]+)", i)] if m]
    if calls:  # subroutines sit after the kernel's body: from the first CALL target on
        first = min(calls)
        _SUB_SPILLS[0] = sum(1 for (a, _), op in zip(body, ops) if a >= first and (op.startswith("STL") or
                                                                                  op.startswith("LDL")))

    def inner(lo, hi):
        return [(s, e) for s, e in loops if lo <= s and e <= hi and (s, e) != (lo, hi)]

    def outermost(ls):
        return [l for l in ls if not any(o != l and o[0] <= l[0] and l[1] <= o[1] for o in ls)]

    est = False

    def count(lo, hi):
        """(instructions, store bytes) of [lo, hi] with nested loops weighted by K."""
        nonlocal est
        nested = outermost(inner(lo, hi))
        n_ins, n_st = 0.0, 0.0
        covered = set()
        for s, e in nested:
            ci, cs = count(s, e)
            trips = K or 1
            est = True
            n_ins += ci * trips
            n_st += cs * trips
            covered.update(range(s, e + 1))
        for j in range(lo, hi + 1):
            if j in covered:
                continue
            n_ins += 1
            if is_store[j]:
                n_st += _width(ops[j]) / 8
        return n_ins, n_st

    if not loops:  # no loop: the cheapest path from entry to exit among those storing the most outputs
        best = _dag_best_path(body, ops, is_store)
        if best is not None:
            n_ins, n_st = best
            _LAST_REGION[0] = "dag"
            return len(body), n_ins, n_st / elem_bytes, est, loads, stores, spills
    store_loops = [l for l in loops if any(is_store[j] for j in range(l[0], l[1] + 1))]
    innermost = [l for l in store_loops if not any(o != l and l[0] <= o[0] and o[1] <= l[1] for o in store_loops)]
    _LAST_REGION[0] = "loop" if innermost else "all"
    if not innermost:
        n_ins, n_st = count(0, len(body) - 1)
        return len(body), n_ins, n_st / elem_bytes, est, loads, stores, spills
    # every innermost store loop (an interior and a bounds-checked copy of one loop, say): the
    # cheapest per output is the steady state; a loop body without nested loops is counted on its
    # best path, as loop-free code is, else all of it (nested loops weighted by K)
    best = None
    for lo, hi in innermost:
        path = _loop_best_path(body, ops, is_store, lo, hi) if not inner(lo, hi) else None
        path_ops = list(_LAST_PATH)
        n_ins, n_st = path if path is not None else count(lo, hi)
        if n_st > 0 and (best is None or n_ins / n_st < best[0] / best[1]):
            best = (n_ins, n_st, path_ops if path is not None else [])
    if best is None:
        n_ins, n_st = count(*innermost[0])
        return len(body), n_ins, n_st / elem_bytes, est, loads, stores, spills
    _LAST_PATH[:] = best[2]
    return len(body), best[0], best[1] / elem_bytes, est, loads, stores, spills


def _loop_best_path(body, ops, is_store, lo: int, hi: int) -> Optional[Tuple[float, float]]:
    """One iteration of the loop body[lo..hi] (hi: its backward branch) as loop-free code: the path
    from lo to hi storing the most, and among those the fewest instructions. Branches leaving the
    body (the loop's exits) are not taken; a CALL counts as one instruction (the subroutines of
    these kernels are slow paths: IEEE division's special cases). None when the body holds another
    backward branch."""
    sub = body[lo:hi + 1]
    sub_ops = ops[lo:hi + 1]
    index = {a: j for j, (a, _) in enumerate(sub)}
    succ: List[List[int]] = []
    for j, (a, ins) in enumerate(sub):
        op = sub_ops[j]
        pred = ins.strip().startswith("@")
        nxt = [j + 1] if j + 1 < len(sub) else []
        if j == len(sub) - 1:
            succ.append([])
        elif op == "BRA" or op.startswith("BRA."):
            tgt = _branch_target(ins)
            if tgt is not None and tgt <= a and tgt in index:
                return None  # a nested loop
            inside = [index[tgt]] if tgt is not None and tgt in index else []
            succ.append(inside + (nxt if pred or tgt is None else []))
        elif op == "EXIT":
            succ.append(nxt if pred else [])
        else:
            succ.append(nxt)
    term = [j == len(sub) - 1 for j in range(len(sub))]  # one iteration ends at the back branch
    return _best_path(sub_ops, is_store[lo:hi + 1], succ, term)


def _branch_target(ins: str) -> Optional[int]:
    m = re.search(r"\bBRA\s+(?:\S+\s+)?0x([0-9a-f]+)", ins)
    return int(m.group(1), 16) if m else None


def _best_path(ops: List[str], is_store: List[bool], succ: List[List[int]], term: List[bool]
               ) -> Optional[Tuple[float, float]]:
    """Over the paths from instruction 0 to a terminal one, the one that stores the most bytes, and
    among those the fewest instructions: (instructions, store bytes), its opcodes in _LAST_PATH.
    None when no terminal is reached or a reachable edge goes backward (the code is not loop-free)."""
    n = len(ops)
    # states[j]: {store bytes: (fewest instructions, predecessor state)} on arrival at j
    states: List[Dict[float, Tuple[float, Optional[Tuple[int, float]]]]] = [dict() for _ in range(n)]
    states[0][0.0] = (0.0, None)
    done: Dict[float, Tuple[float, Tuple[int, float]]] = {}
    for j in range(n):
        sb = _width(ops[j]) / 8 if is_store[j] else 0.0
        for st, (ins_count, _) in states[j].items():
            st2, c2 = st + sb, ins_count + 1
            if term[j] and c2 < done.get(st2, (float("inf"),))[0]:
                done[st2] = (c2, (j, st))
            for k in succ[j]:
                if k <= j:
                    return None  # a backward edge reached: not loop-free after all
                if c2 < states[k].get(st2, (float("inf"),))[0]:
                    states[k][st2] = (c2, (j, st))
    if not done:
        return None
    st = max(done)
    path, node = [], done[st][1]
    while node is not None:
        path.append(node[0])
        node = states[node[0]][node[1]][1]
    _LAST_PATH[:] = [ops[j] for j in reversed(path)]
    return done[st][0], st


def _dag_best_path(body, ops, is_store) -> Optional[Tuple[float, float]]:
    """Loop-free code: over the paths from the entry to an EXIT, the one that stores the most bytes,
    and among those the fewest instructions: (instructions, store bytes). A kernel with an interior
    fast path and a bounds-checked border path is counted on the interior path (the steady state).
    None when the control flow is not understood (indirect branches, calls)."""
    if any(op in ("BRX", "CALL", "RET", "JMX") for op in ops):
        return None
    n = len(body)
    index = {a: j for j, (a, _) in enumerate(body)}
    succ: List[List[int]] = []
    term: List[bool] = []
    for j, (a, ins) in enumerate(body):
        op = ops[j]
        pred = ins.strip().startswith("@")
        nxt = [j + 1] if j + 1 < n else []
        if op == "BRA" or op.startswith("BRA."):
            tgt = _branch_target(ins)
            if tgt is None or tgt not in index:
                return None
            succ.append(([index[tgt]] + (nxt if pred else [])))
            term.append(False)
        elif op == "EXIT":
            succ.append(nxt if pred else [])
            term.append(True)
        else:
            succ.append(nxt)
            term.append(False)
    return _best_path(ops, is_store, succ, term)


_LAST_PATH: List[str] = []  # opcodes of the last path _dag_best_path chose (--explain)
_SUB_SPILLS = [0]  # spill instructions of the last analysed function inside CALLed subroutines
_LAST_REGION = ["all"]  # what analyse counted last: "loop" (one iteration), "dag" (one path) or "all"


# ---------------------------------------------------------------------------------------------
# Budgets (issue 14): instructions per output element, steady state.

def _fast_budget(tag: str, dtype: str, act: str, K: Optional[int], S: Optional[int]) -> Optional[float]:
    extra = 6 if act in ("hardswish", "silu") else 0
    if tag == "FwdWin" and dtype in ("c10::Half", "c10::BFloat16"):
        if K == 3:
            return (20 if S == 1 else 40) + extra
        if K == 5:
            return (45 if S == 1 else 90) + extra
        if K == 7:
            return (80 if S == 1 else 160) + extra
    if tag == "FwdNchw" and dtype == "float":
        if K == 3:
            return (35 if S == 1 else 50) + extra
    return None


def _bwd_budget(dtype: str, cl: bool, K: Optional[int], S: Optional[int], train: bool) -> Optional[float]:
    """BwdFused<T, K, S, channels_last, smooth, train>: 40 for channels_last fp16/bf16 stride 1,
    60 for every other 3x3 class (stride 2; fp32 or NCHW stride 1); +3 for training."""
    if K != 3 or S not in (1, 2):
        return None
    base = 40.0 if (S == 1 and cl and dtype != "float") else 60.0
    return base + (3 if train else 0)


# Tags whose kernels are a fast path (asserted by --check; FwdScalarWin also holds the fallbacks,
# held to 3x their class's fast budget: C % vec != 0, unaligned views, dilation), and the generic
# kernels of the shapes outside the specialised set (reported, no budget).
FAST_TAGS = ("FwdWin", "FwdNchw", "FwdScalarWin")
GENERIC_TAGS = ("FwdGeneral", "FwdVec")


def classify(k: Kernel, demangled: str) -> None:
    m = re.search(r"kern::(\w+)<([^<>]*(?:<[^<>]*>[^<>]*)*)>", demangled)
    if not m:
        k.tag = demangled.split("(")[0][-60:]
        return
    k.tag = m.group(1)
    args = [a.strip() for a in re.split(r",(?![^<]*>)", m.group(2))]
    if args:
        k.dtype = args[0]
    am = re.search(r"\(fastdw::Act\)(\d)", m.group(2))
    if am:
        k.act = _ACT_NAMES.get(int(am.group(1)), am.group(1))
    ints = [int(a) for a in args[1:] if re.fullmatch(r"\d+", a)]
    if ints:
        k.K = ints[0]
    if len(ints) > 1:
        k.S = ints[1]
    bools = [a == "true" for a in args[1:] if a in ("true", "false")]
    if k.tag == "FwdScalarWin":  # <T, K, S, TH, TW, channels_last, smooth activation, dilated>
        cl, smooth, dil = (bools + [False, False, False])[:3]
        # the path counted: the clamp (the costliest of the ReLU family) / the cheaper smooth one
        k.act = "hardswish" if smooth else "relu6"
        if dil:  # dilation, every activation: 3x the fast budget of its class (the path counted: the clamp)
            k.act = "any"
            if cl and k.dtype in ("c10::Half", "c10::BFloat16"):
                base = _fast_budget("FwdWin", k.dtype, "relu6", k.K, k.S) if k.K in (5, 7) else \
                    _fast_budget("FwdWin", "c10::Half", "relu6", 3, k.S)
            elif cl:
                base = _fast_budget("FwdWin", "c10::Half", "relu6", 3, k.S) if k.K == 3 else None
            else:
                base = _fast_budget("FwdNchw", "float", "relu6", 3, k.S) if k.K == 3 and k.dtype == "float" else None
            k.budget = 3 * base if base is not None else None
        elif cl and k.K in (5, 7) and k.dtype in ("c10::Half", "c10::BFloat16"):
            k.budget = _fast_budget("FwdWin", k.dtype, k.act, k.K, k.S)  # the 5x5 / 7x7 channels_last path
            k.fast_path = k.budget is not None
        elif cl and k.K == 3:  # the fallback of the 3x3 channels_last class (C % vec != 0, unaligned, dilated)
            base = _fast_budget("FwdWin", "c10::Half", k.act, 3, k.S)
            k.budget = 3 * base if base is not None else None
        elif not cl and k.K == 3 and k.dtype == "float":  # the fallback of the NCHW fp32 3x3 class (dilated)
            base = _fast_budget("FwdNchw", "float", k.act, 3, k.S)
            k.budget = 3 * base if base is not None else None
        return
    if k.tag == "BwdFused":  # <T, K, S, channels_last, smooth activation, train>
        cl, smooth, train = (bools + [False, False, False])[:3]
        k.act = "hardswish" if smooth else "relu6"
        k.budget = _bwd_budget(k.dtype, cl, k.K, k.S, train)
        k.fast_path = k.budget is not None
        return
    if k.tag == "FwdWin" and len(ints) >= 4 and ints[2] * ints[3] == 1:
        k.note = "small-problem tile (one output vector per thread, < 32768 strip threads): latency-bound, no budget"
    elif k.tag in FAST_TAGS:
        k.budget = _fast_budget(k.tag, k.dtype, k.act, k.K, k.S)
        k.fast_path = k.budget is not None
    elif k.tag in GENERIC_TAGS:
        k.note = ("generic kernel: the shapes no window kernel covers (kernel sizes other than 3/5/7, "
                  "non-square kernels, strides above 2, one image past 2^31 elements); no budget")


def _display(demangled: str) -> str:
    """body_kernel<kern::FwdWin<c10::Half, (fastdw::Act)2, 3, 1, 8, 2>, kern::Args> -> FwdWin<Half, relu6, 3, 1, 8, 2>"""
    m = re.search(r"kern::(\w+<.*?>)(?:, fastdw::kern::\w+>|>\()", demangled)
    s = m.group(1) if m else demangled.split("(")[0]
    s = re.sub(r"\(fastdw::Act\)(\d)", lambda a: _ACT_NAMES.get(int(a.group(1)), a.group(1)), s)
    return s.replace("c10::", "").replace("fastdw::", "").replace("kern::", "")


def warps_per_sm(regs: int, threads: int, smem: int) -> int:
    if threads <= 0:
        return 0
    warps_blk = -(-threads // 32)
    regs_warp = -(-max(regs, 1) * 32 // 256) * 256  # allocation unit: 256 registers per warp
    warps_by_regs = 4 * ((SM_REGS // 4) // regs_warp)  # four sub-partitions
    blocks = min(SM_BLOCKS, warps_by_regs // warps_blk, (SM_WARPS * 32) // (warps_blk * 32))
    if smem > 0:
        blocks = min(blocks, SM_SMEM // smem)
    return blocks * warps_blk


def max_threads(elf_text: str) -> Dict[str, int]:
    out, cur = {}, None
    lines = elf_text.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"\.nv\.info\.(\S+)", line) if ".nv.info." in line else None
        if m:
            cur = m.group(1)
        if cur and "EIATTR_MAX_THREADS" in line:
            for nxt in lines[i + 1:i + 4]:
                vm = re.search(r"Value:\s+(0x[0-9a-f]+)", nxt)
                if vm:
                    out[cur] = int(vm.group(1), 16)
                    break
    return out


def report(so: str, arch: str, filt: Optional[str], explain: bool = False) -> List[Kernel]:
    cuobjdump, tooldir = find_tools()
    env = dict(os.environ, PATH=tooldir + os.pathsep + os.environ.get("PATH", ""))
    elfs = [l.split(":")[-1].strip() for l in run([cuobjdump, "--list-elf", so], env).splitlines() if "ELF file" in l]
    elfs = [e for e in elfs if e.endswith(f".sm_{arch}.cubin")]
    if not elfs:
        raise SystemExit(f"sass_budget: no sm_{arch} cubin in {so} (built without CUDA, or for other archs)")
    kernels: List[Kernel] = []
    with tempfile.TemporaryDirectory() as tmp:
        def dump(e):  # the cuobjdump runs of one cubin (most of the time: run them side by side)
            subprocess.run([cuobjdump, "-xelf", e, so], cwd=tmp, capture_output=True, check=True, env=env)
            cub = os.path.join(tmp, e)
            return [run([cuobjdump, flag, cub], env) for flag in ("-sass", "-res-usage", "-elf")]

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, min(len(elfs), os.cpu_count() or 1))) as pool:
            dumps = list(pool.map(dump, elfs))
        for sass_text, res, elf_text in dumps:
            sass = parse_sass(sass_text)
            mt = max_threads(elf_text)
            usage = {}
            for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res):
                usage[m.group(1)] = tuple(int(m.group(i)) for i in range(2, 6))
            names = demangle(list(sass))
            for mangled, instrs in sass.items():
                dm = names.get(mangled, mangled)
                if filt and not re.search(filt, dm):
                    continue
                if any(k.mangled == mangled for k in kernels):  # the same instantiation in two cubins
                    continue
                k = Kernel(kernel=_display(dm), arch=f"sm_{arch}", mangled=mangled)
                classify(k, dm)
                regs, stack, shared, local = usage.get(mangled, (0, 0, 0, 0))
                k.registers, k.stack_bytes, k.shared_bytes, k.local_bytes = regs, stack, shared, local
                k.threads_per_block = mt.get(mangled, 0)
                k.warps_per_sm = warps_per_sm(regs, k.threads_per_block, shared)
                eb = _ELEM.get(k.dtype, 4)
                tot, n_ins, n_out, est, ld, st, sp = analyse(instrs, eb, k.K)
                if k.tag == "BwdFused" and k.K and _LAST_REGION[0] != "loop":
                    # dx elements: less the per-tile sums (fp32 each), written after the row loop
                    n_out = max(0.0, n_out - (k.K * k.K + 2) * 4 / eb)
                k.instr_total, k.region_instr, k.outputs_per_region, k.estimated = tot, n_ins, n_out, est
                k.load_bits, k.store_bits, k.spill_instr = ld, st, sp
                k.spill_instr_sub = _SUB_SPILLS[0]
                if explain:
                    _explain(k.kernel, n_out)
                _LAST_PATH.clear()
                k.spill_bytes = max(stack, local) if sp else 0
                if n_out > 0:
                    k.instr_per_output = round(n_ins / n_out, 2)
                if k.budget is not None:
                    narrow = k.fast_path and k.dtype in ("c10::Half", "c10::BFloat16") and k.tag == "FwdWin" and \
                        (set(ld) - {128} or set(st) - {128})
                    # (a subroutine's spill runs only on its rare slow path)
                    _judge(k, f"spills ({sp} STL/LDL, {k.spill_bytes} B)" if sp > k.spill_instr_sub else None,
                           k.fast_path, [f"global loads {ld} / stores {st} bits, not all 128"] if narrow else [])
                kernels.append(k)
    return kernels


# ---------------------------------------------------------------------------------------------
# Triton kernels (issue 16): compiled for the arch by Triton itself, without a GPU.

TRITON_SCALE = 1.25  # the Triton backend's budgets: the CUDA kernels' times 1.25
# (layout, dtype, K, S): the forward classes the CUDA budgets name; --quick: the first of each layout
TRITON_CASES = [("channels_last", "fp16", 3, 1), ("channels_last", "fp16", 3, 2), ("channels_last", "fp16", 5, 1),
                ("channels_last", "fp16", 7, 1), ("contiguous", "fp32", 3, 1), ("contiguous", "fp32", 3, 2)]


def _triton_budget(kind: str, cl: bool, dtype: str, K: int, S: int) -> Optional[float]:
    """fwd: the CUDA forward budget of the class times 1.25 (act relu6); bwd: the fused backward's
    (per dx element, gu and dx kernels together) times 1.25."""
    cdt = "c10::Half" if dtype == "fp16" else "float"
    if kind == "fwd":
        b = _fast_budget("FwdWin" if cl else "FwdNchw", cdt, "relu6", K, S)
    else:
        b = _bwd_budget(cdt, cl, K, S, False)
    return None if b is None else round(b * TRITON_SCALE, 2)


def _explain(name: str, n_out: int) -> None:
    """--explain: the counted path's opcodes per output element."""
    from collections import Counter

    hist = Counter(op.split(".")[0] for op in _LAST_PATH) if _LAST_PATH else {}
    per = {o: round(c / n_out, 2) for o, c in sorted(hist.items(), key=lambda kv: -kv[1])} if n_out else {}
    print(f"{name}: path of {len(_LAST_PATH)} instructions, per output: {per}")


def triton_report(arch: str, quick: bool = False, all_configs: bool = True, explain: bool = False) -> List[Kernel]:
    """Every autotune config of the Triton forward, gu and dx kernels for the TRITON_CASES classes
    (relu6), compiled for sm_<arch> as the JIT would specialize a MobileNet-like call (the launches
    recorded by scripts/triton_compile_check.py), read like the CUDA kernels: registers and spills
    from ptxas, the SASS instruction count of a program's thread over the outputs it stores, on
    the steady state: one trip of the cheapest row loop per output (the unmasked interior one; a
    loop with a nested runtime loop counts that one K trips, as the older tile kernels had). One
    row per kernel and config, named triton:...; plus one row per backward class and config pair
    index summing gu (per output, times 1/S^2) and dx (per dx element), which carries the backward
    budget."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("sass_budget --triton: unset TRITON_INTERPRET (the interpreter has nothing to compile)")
    import importlib.util

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    spec = importlib.util.spec_from_file_location("triton_compile_check", ROOT / "scripts" / "triton_compile_check.py")
    tcc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tcc)
    cuobjdump, tooldir = find_tools()
    env = dict(os.environ, PATH=tooldir + os.pathsep + os.environ.get("PATH", ""))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    dts = {"fp16": torch.float16, "fp32": torch.float32}
    target = GPUTarget("cuda", int(arch), 32)
    backend = make_backend(target)
    out: List[Kernel] = []
    for layout, dt, K, S in (TRITON_CASES[::4] if quick else TRITON_CASES):
        cl = layout == "channels_last"
        calls = tcc._record([(layout, dts[dt], K, S, "relu6", True)])
        per_kind: Dict[str, List[Kernel]] = {}
        for kernel, a, kw in calls:
            fn = tcc._configs_of(kernel)[0]
            kind = {"_dwconv_fwd_kernel": "fwd", "_dwconv_bwd_gu_kernel": "gu", "_dwconv_bwd_dx_kernel": "dx",
                    "_dwconv_bwd_dx_rows_kernel": "dx", "_dwconv_bwd_dx_s2_kernel": "dx"}.get(fn.__name__)
            # the inference kernels only (the training variants: TRAIN / HAS_CENTER)
            if kind is None or kw.get("TRAIN") or kw.get("HAS_CENTER") or kind in per_kind:
                continue
            per_kind[kind] = []
            for ci, cfg in enumerate(kernel.configs if all_configs else kernel.configs[:1]):
                sig, const, attrs = tcc._signature(fn, a, kw, cfg)
                opts = backend.parse_options({"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
                ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs), target=target,
                                    options=opts.__dict__)
                # (the backward's band kernels: BAND rows, chosen on the host, in place of BLOCK_H)
                tile = "x".join(str(cfg.kwargs.get(k, "band")) for k in ("BLOCK_H", "BLOCK_W", "BLOCK_C"))
                name = (f"triton:{fn.__name__.strip('_')}<{dt}, {'CL' if cl else 'NCHW'}, {K}, {S}, {tile}, "
                        f"w{cfg.num_warps}>")
                k = Kernel(kernel=name, arch=f"sm_{arch}", mangled=name, tag=f"triton_{kind}", dtype=dt,
                           act="relu6", K=K, S=S)
                res = tcc._resources(ck.asm["ptx"], int(arch), ptxas) or {}
                k.registers = res.get("regs", 0)
                k.stack_bytes = res.get("stack", 0)
                k.spill_bytes = res.get("spill_stores", 0)
                k.threads_per_block = cfg.num_warps * 32
                k.shared_bytes = int(getattr(ck.metadata, "shared", 0) or 0)
                k.warps_per_sm = warps_per_sm(k.registers, k.threads_per_block, k.shared_bytes)
                with tempfile.TemporaryDirectory() as tmp:
                    cub = os.path.join(tmp, "k.cubin")
                    Path(cub).write_bytes(ck.asm["cubin"])
                    sass = parse_sass(run([cuobjdump, "-sass", cub], env))
                instrs = next(iter(sass.values()))
                eb = 4 if dt == "fp32" else 2  # gu stores gc in x's dtype
                tot, n_ins, n_out, est, ld, st, sp = analyse(instrs, eb, K)
                if explain:
                    _explain(name, n_out)
                _LAST_PATH.clear()
                k.instr_total, k.region_instr, k.outputs_per_region, k.estimated = tot, n_ins, n_out, est
                k.load_bits, k.store_bits, k.spill_instr = ld, st, sp
                if n_out > 0:
                    k.instr_per_output = round(n_ins / n_out, 2)
                if kind == "fwd":
                    k.budget = _triton_budget("fwd", cl, dt, K, S)
                per_kind[kind].append(k)
                out.append(k)
        for i, (gu, dx) in enumerate(zip(per_kind.get("gu", []), per_kind.get("dx", []))):
            if gu.instr_per_output is None or dx.instr_per_output is None:
                continue
            tile = dx.kernel.split(", ")[4]
            k = Kernel(kernel=f"triton:bwd(gu+dx)<{dt}, {'CL' if cl else 'NCHW'}, {K}, {S}, {tile}>", arch=f"sm_{arch}",
                       mangled="", tag="triton_bwd", dtype=dt, act="relu6", K=K, S=S, estimated=True)
            k.registers = max(gu.registers, dx.registers)
            k.spill_bytes = gu.spill_bytes + dx.spill_bytes
            k.warps_per_sm = min(gu.warps_per_sm, dx.warps_per_sm)
            k.threads_per_block = dx.threads_per_block
            k.instr_per_output = round(gu.instr_per_output / (S * S) + dx.instr_per_output, 2)
            k.budget = _triton_budget("bwd", cl, dt, K, S)
            out.append(k)
    for k in out:
        if k.budget is not None:
            _judge(k, f"spills ({k.spill_bytes} B)" if k.spill_bytes else None, True, [])
    return out


def _judge(k: Kernel, spill: Optional[str], check_warps: bool, more: List[str]) -> None:
    """k.ok and k.note of a budgeted kernel: its instructions per output against the budget, the
    spill (a description, or None), fewer than 8 resident warps per SM (when check_warps), and the
    caller's other reasons."""
    reasons = []
    if k.instr_per_output is None or k.instr_per_output > k.budget:
        reasons.append(f"{k.instr_per_output} instr/output > budget {k.budget}")
    if spill:
        reasons.append(spill)
    if check_warps and k.warps_per_sm < 8:
        reasons.append(f"{k.warps_per_sm} resident warps/SM < 8")
    k.ok = not (reasons + more)
    k.note = "; ".join(reasons + more)


def table(ks: List[Kernel]) -> str:
    rows = ["| kernel | regs | spill B | threads | warps/SM | LDG bits | STG bits | instr/output | budget | ok |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted(ks, key=lambda k: (k.budget is None, k.kernel)):
        ipo = "-" if k.instr_per_output is None else f"{k.instr_per_output:.1f}{' est' if k.estimated else ''}"
        rows.append(f"| {k.kernel} | {k.registers} | {k.spill_bytes} | {k.threads_per_block} | {k.warps_per_sm} | "
                    f"{','.join(map(str, k.load_bits)) or '-'} | {','.join(map(str, k.store_bits)) or '-'} | {ipo} | "
                    f"{k.budget if k.budget is not None else '-'} | "
                    f"{'-' if k.ok is None else ('yes' if k.ok else 'NO: ' + k.note)} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--so", help="the extension (default: fastdw._C of this tree)")
    ap.add_argument("--arch", default="90")
    ap.add_argument("--filter", help="regex on the demangled kernel name")
    ap.add_argument("--json", help="write the rows as JSON")
    ap.add_argument("--check", action="store_true", help="exit 1 when a budgeted kernel breaks its budget or spills")
    ap.add_argument("--explain", action="store_true", help="per kernel: the counted path's opcodes per output")
    ap.add_argument("--triton", action="store_true",
                    help="also the Triton kernels (every autotune config; compiled here, minutes)")
    ap.add_argument("--triton-only", action="store_true", help="only the Triton kernels (no extension needed)")
    ap.add_argument("--quick", action="store_true", help="Triton: one class per layout, first config")
    ap.add_argument("--check-triton", action="store_true",
                    help="with --check: the Triton kernels' budgets fail too (reported only otherwise, until "
                         "their rework)")
    args = ap.parse_args(argv)
    if args.triton_only:
        ks = triton_report(args.arch, args.quick, all_configs=not args.quick, explain=args.explain)
        print(f"Triton {len(ks)} kernels for sm_{args.arch}")
        return _finish(ks, args)
    so = args.so
    if so is None:
        hits = sorted(glob.glob(str(ROOT / "fastdw" / "_C*.so")))
        if not hits:
            raise SystemExit("sass_budget: no built extension in fastdw/ (pass --so)")
        import sysconfig

        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ""
        so = next((h for h in hits if h.endswith(suffix)), hits[0])
    ks = report(so, args.arch, args.filter, args.explain)
    print(f"{Path(so).name}: {len(ks)} kernels for sm_{args.arch}")
    if args.triton:
        ks += triton_report(args.arch, args.quick, all_configs=not args.quick, explain=args.explain)
    return _finish(ks, args)


def _finish(ks: List[Kernel], args) -> int:
    print(table(ks))
    if args.json:
        Path(args.json).write_text(json.dumps([dict(asdict(k), kernel=k.kernel) for k in ks], indent=1))
    bad = [k for k in ks if k.ok is False]
    if bad:
        print(f"\n{len(bad)} kernels break their budget:", *(f"  {k.kernel}: {k.note}" for k in bad), sep="\n")
    held = [k for k in bad if args.check_triton or not k.kernel.startswith("triton:")]
    return 1 if (args.check and held) else 0


if __name__ == "__main__":
    sys.exit(main())
