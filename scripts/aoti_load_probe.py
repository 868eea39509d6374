"""Does torch's AOTInductor runtime load a package on this machine, with and without matchrt's
compiler probe?

Builds a two-layer CUDA package (Conv2d + ReLU, ~2.4 MB, about a minute) twice, in parallel: with
the C++ compiler torch is configured with (CXX), and with the one matchrt's build would choose
(matchrt.cxx_toolchain; the same unless CXX links libstdc++ statically). Each is loaded in fresh
processes three ways: `aoti_load_package`, the same after initialising CUDA, and the package's
wrapper `.so` handed to torch's runner directly; each way prints `ok` or how its process died.
On the lent H200s and H100 (torch 2.11.0+cu130, CXX=/opt/gcc/bin/g++) every load of the first kind
died with SIGSEGV (docs/bench/inductor_load_segfault_root_cause.txt).

    python3 scripts/aoti_load_probe.py [WORK_DIR=/tmp/aoti_probe]
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
import zipfile


def build(path: str, compiler: str) -> None:
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU()).cuda().eval()
    program = torch.export.export(model, (torch.rand(1, 3, 32, 32, device="cuda"),))
    configs = {"cpp.cxx": (None, compiler)} if compiler else {}
    torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs=configs)


def load(way: str, path: str) -> None:
    import torch

    if way != "plain":
        torch.zeros(1, device="cuda")
    x = torch.rand(1, 3, 32, 32, device="cuda")
    if way == "runner":
        folder = path + ".unpacked"
        zipfile.ZipFile(path).extractall(folder)
        so = glob.glob(folder + "/**/*.so", recursive=True)[0]
        runner = torch._C._aoti.AOTIModelContainerRunnerCuda(so, 1, "cuda", os.path.dirname(so))
        runner.run([x])
    else:
        torch._inductor.aoti_load_package(path)(x)
    torch.cuda.synchronize()


def child(args: list[str], timeout: float = 300) -> str:
    start = time.time()
    try:
        proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    took = f"{time.time() - start:.1f} s"
    if proc.returncode == 0:
        return f"ok ({took})"
    if proc.returncode < 0:
        return f"died: {signal.Signals(-proc.returncode).name} ({took})"
    lines = proc.stderr.strip().splitlines()
    return f"failed: {lines[-1] if lines else proc.returncode} ({took})"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--build", "--load"):
        build(sys.argv[2], sys.argv[3]) if sys.argv[1] == "--build" else load(sys.argv[2], sys.argv[3])
        return
    import torch

    from matchrt.cxx_toolchain import choose_compiler, configured_compiler
    from matchrt.errors import MatchrtError

    work = sys.argv[1] if len(sys.argv) > 1 else "/tmp/aoti_probe"
    os.makedirs(work, exist_ok=True)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}", flush=True)
    compilers = {"configured": configured_compiler()}
    try:
        _, compilers["matchrt"], note = choose_compiler({})
        print("matchrt's compiler probe:", note or f"{compilers['matchrt']} passes", flush=True)
    except MatchrtError as exc:
        print("matchrt's compiler probe:", exc, flush=True)
    if compilers.get("matchrt") == compilers["configured"]:
        del compilers["matchrt"]
    paths = {k: os.path.join(work, f"toy_cuda_{k}.pt2") for k in compilers}
    start = time.time()
    builds = {k: subprocess.Popen([sys.executable, __file__, "--build", paths[k], cxx],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
              for k, cxx in compilers.items()}
    for k, proc in builds.items():
        _, err = proc.communicate(timeout=600)
        tail = (err.strip().splitlines() or ["-"])[-1]
        print(f"build with {compilers[k]} ({k}):", "ok" if proc.returncode == 0 else f"failed: {tail}",
              f"({time.time() - start:.1f} s)", flush=True)
    for k, path in paths.items():
        if os.path.exists(path):
            for way in ("plain", "cuda-initialised", "runner"):
                print(f"load {k} ({way}):", child(["--load", way, path]), flush=True)


if __name__ == "__main__":
    main()
