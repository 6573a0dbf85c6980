"""Guards on the wheels carried to a lent GPU machine (bench/gpu_wheels.sh fills .whl/ with them).

    python bench/gpu_wheels_check.py [WHEEL_DIR]      # default .whl; exit 1 naming every problem

1. What travels, the wheels and the checkout's tracked files (`git ls-files`), is at most 60 MiB
   (the device tool's cap is 64 MiB).
2. Every carried wheel's Requires-Dist, its markers evaluated for the image's Python 3.12 on linux
   x86_64 and extras followed only where a carried wheel asks for them, is met by the carried set
   itself or by IMAGE, the image's packages. An IMAGE version of None means "there, version not
   read": only its presence is checked. The extras of an image package are not followed (its
   metadata is not here): a requirement like fsspec[http] needs its extra's packages in IMAGE.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

MAX_TRAVEL = 60 * 2**20

# The GPU image's packages that ftl or a carried wheel needs (/work/.library/device/KINDS.md lists
# them all: names, and versions for the first rows). bench/gpu_wheels.sh carries what is not here.
IMAGE: dict[str, str | None] = {
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "huggingface-hub": "1.33.0",
    "tokenizers": "0.23.2",
    "safetensors": "0.8.0",
    "accelerate": "1.15.0",
    "numpy": "2.5.2",
    "triton": "3.6.0",
    # ftl's own imports, and what the carried wheels and the packages above require
    "jinja2": None,
    "markupsafe": None,
    "rich": None,
    "markdown-it-py": None,
    "mdurl": None,
    "pygments": None,
    "pyyaml": None,
    "packaging": None,
    "psutil": None,
    "requests": None,
    "urllib3": None,
    "certifi": None,
    "charset-normalizer": None,
    "idna": None,
    "tqdm": None,
    "regex": None,
    "filelock": None,
    "fsspec": None,
    "pandas": None,
    "python-dateutil": None,
    "six": None,
    "pyarrow": None,
    "xxhash": None,
    "httpx": None,
    "httpcore": None,
    "h11": None,
    "anyio": None,
    "hf-xet": None,
    "aiohttp": None,
    "aiohappyeyeballs": None,
    "aiosignal": None,
    "attrs": None,
    "frozenlist": None,
    "multidict": None,
    "propcache": None,
    "yarl": None,
    "typing-extensions": None,
    "typer": None,
    "click": None,
    "shellingham": None,
    "annotated-doc": None,
    "sympy": None,
    "mpmath": None,
    "networkx": None,
    "setuptools": None,
    "msgpack": None,
    "ninja": None,
    "einops": None,
    "py-cpuinfo": None,
    "nvidia-ml-py": None,
    "absl-py": None,
    "joblib": None,
    "sacrebleu": None,
    "portalocker": None,
    "tabulate": None,
    "colorama": None,
    "lxml": None,
    "matplotlib": None,
    "contourpy": None,
    "cycler": None,
    "fonttools": None,
    "kiwisolver": None,
    "pillow": None,
    "pyparsing": None,
    # the gpu-marked tests' runner
    "pytest": None,
    "pluggy": None,
    "iniconfig": None,
    "pytest-timeout": None,
    "pytest-xdist": None,
    "execnet": None,
}

# The image's interpreter, for environment markers.
MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "implementation_version": "3.12.3",
    "os_name": "posix",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "platform_release": "",
    "platform_version": "",
}


def travel_size(wheel_dir: Path, root: Path) -> tuple[int, int]:
    """Bytes of the carried wheels, and of the checkout's tracked files."""
    wheels = sum(p.stat().st_size for p in wheel_dir.glob("*.whl"))
    names = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True, check=True).stdout
    tracked = sum(p.stat().st_size for p in (root / n for n in names.split("\0") if n) if p.is_file())
    return wheels, tracked


def wheel_metadata(wheel: Path) -> tuple[str, str, str | None, list[Requirement]]:
    """A wheel's name, version, Requires-Python and Requires-Dist, read from its METADATA."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(name).decode())
    return (
        meta["Name"],
        meta["Version"],
        meta["Requires-Python"],
        [Requirement(r) for r in meta.get_all("Requires-Dist") or []],
    )


def unmet(wheel_dir: Path, image: dict[str, str | None] = IMAGE) -> list[str]:
    """Each requirement of a carried wheel that neither the carried set nor `image` meets."""
    carried = {
        canonicalize_name(name): (wheel, version, python, reqs)
        for wheel in sorted(wheel_dir.glob("*.whl"))
        for name, version, python, reqs in [wheel_metadata(wheel)]
    }
    problems = []
    for name in sorted(carried):
        wheel, _, python, _ = carried[name]
        if python and not SpecifierSet(python).contains(MARKERS["python_full_version"]):
            problems.append(
                f"{wheel.name}: Requires-Python {python}, the image has Python {MARKERS['python_full_version']}"
            )
        if name in image:
            problems.append(f"{wheel.name}: the image has {name} {image[name] or ''}; a second copy would shadow it")
    # Follow the requirements from every carried wheel, with the extras a carried wheel asks of another.
    todo = [(name, "") for name in carried]
    seen = set()
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        wheel, _, _, reqs = carried[name]
        for req in reqs:
            if req.marker and not req.marker.evaluate({**MARKERS, "extra": extra}):
                continue
            dep = canonicalize_name(req.name)
            if dep in carried:
                version = carried[dep][1]
                todo += [(dep, e) for e in sorted(req.extras)]
            elif dep in image:
                version = image[dep]
            else:
                problems.append(f"{wheel.name}: requires {req}, neither carried nor in the image")
                continue
            if version is not None and not req.specifier.contains(version, prereleases=True):
                where = "carried" if dep in carried else "in the image"
                problems.append(f"{wheel.name}: requires {req}, {where} is {dep} {version}")
    return problems


def main(argv: list[str]) -> int:
    wheel_dir = Path(argv[0] if argv else ".whl")
    root = Path(__file__).resolve().parent.parent
    wheels, tracked = travel_size(wheel_dir, root)
    mib = 2**20
    print(
        f"travels: wheels {wheels / mib:.1f} MiB + tracked files {tracked / mib:.1f} MiB = {(wheels + tracked) / mib:.1f} MiB"
        f" (at most {MAX_TRAVEL / mib:.0f} MiB)"
    )
    problems = []
    if wheels + tracked > MAX_TRAVEL:
        big = sorted(wheel_dir.glob("*.whl"), key=lambda p: -p.stat().st_size)[:5]
        problems.append(
            f"{(wheels + tracked) / mib:.1f} MiB travels, over {MAX_TRAVEL / mib:.0f} MiB; largest wheels: "
            + ", ".join(f"{p.name} {p.stat().st_size / mib:.1f} MiB" for p in big)
        )
    problems += unmet(wheel_dir)
    for p in problems:
        print("FAIL", p)
    if not problems:
        print(
            f"requirements: every Requires-Dist of the {len(list(wheel_dir.glob('*.whl')))} wheels is met by them or the image"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
