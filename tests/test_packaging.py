"""The installed distribution: only `jaxemb` (kernels mapped to jaxemb.kernels), every package folder listed."""
import os
import subprocess
import sys
import tomllib
import zipfile

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _folders(top, name):
    out = set()
    for d, _, files in os.walk(os.path.join(ROOT, top)):
        if "__init__.py" in files:
            rel = os.path.relpath(d, os.path.join(ROOT, top))
            out.add(name if rel == "." else f"{name}.{rel.replace(os.sep, '.')}")
    return out


def test_pyproject_lists_every_package_folder():
    cfg = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["tool"]["setuptools"]
    assert set(cfg["packages"]) == _folders("jaxemb", "jaxemb") | _folders("kernels", "jaxemb.kernels")
    assert cfg["package-dir"] == {"jaxemb.kernels": "kernels"}


def test_wheel_holds_only_jaxemb(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), ROOT], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("jaxemb-*.whl")
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"jaxemb"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "jaxemb/kernels/attention_pool/api.py" in names and "jaxemb/kernels/bench.py" in names
