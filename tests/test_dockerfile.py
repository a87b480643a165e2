"""The Dockerfile, checked statically (no docker engine here): it installs exactly the package
set of pyproject.toml, matches torch's CUDA build to the base image, runs as a numeric
non-root user that the manifests agree on, carries OCI labels and no credentials."""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
DEPENDENCIES = {canonicalize_name(Requirement(r).name): Requirement(r) for r in PROJECT["dependencies"]}
OPTION_WITH_VALUE = {"-c", "--constraint", "-i", "--index-url", "--extra-index-url", "-f",
                     "--find-links", "-r", "--requirement", "-t", "--target", "--prefix", "--root"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        full = buf + line
        buf = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


DOCKERFILE = instructions((REPO / "Dockerfile").read_text())


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = [[]]
    for ins in DOCKERFILE:
        if ins[0] == "FROM":
            result.append([])
        result[-1].append(ins)
    return result  # result[0]: global ARGs before the first FROM


def arg_defaults() -> dict[str, str]:
    return dict(a.split("=", 1) for k, a in DOCKERFILE if k == "ARG" and "=" in a)


def expand(text: str) -> str:
    args = arg_defaults()
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def run_commands() -> list[list[str]]:
    """Every simple shell command of every RUN, tokenised."""
    cmds = []
    for kind, rest in DOCKERFILE:
        if kind == "RUN":
            for part in re.split(r"&&|\|\||;|\|", rest):
                if part.strip():
                    cmds.append(shlex.split(part))
    return cmds


def pip_installs() -> list[list[str]]:
    return [c[c.index("install") + 1:] for c in run_commands()
            if "install" in c and (Path(c[0]).name in {"pip", "pip3"} or c[1:3] == ["-m", "pip"])]


def copy_destinations() -> dict[str, str]:
    """Build-context source -> destination path of every plain COPY (no --from)."""
    out = {}
    for kind, rest in DOCKERFILE:
        if kind == "COPY" and "--from" not in rest:
            parts = [p for p in rest.split() if not p.startswith("--")]
            *sources, dest = parts
            for src in sources:
                out[src] = dest.rstrip("/") + ("/" + Path(src).name if dest.endswith("/") else "")
    return out


def test_installs_exactly_the_pyproject_package_set() -> None:
    copies = copy_destinations()
    project_dirs = {str(Path(dest).parent) for src, dest in copies.items() if src == "pyproject.toml"}
    assert project_dirs, "pyproject.toml is never copied into the image"
    installs = pip_installs()
    assert installs, "no pip install found"
    project_installs = 0
    for args in installs:
        it = iter(args)
        for tok in it:
            if tok in OPTION_WITH_VALUE:
                value = next(it)
                assert tok not in {"-r", "--requirement"}, "requirement files bypass pyproject.toml"
                if tok in {"-c", "--constraint"}:
                    assert value == "/tmp/constraints.txt"
                continue
            if tok.startswith("-"):
                assert tok not in {"--trusted-host", "--no-deps"}, tok
                continue
            path, _, extras = tok.partition("[")
            if path.startswith(("/", ".")):
                assert path.rstrip("/") in project_dirs, f"pip installs {path}, not the pyproject directory"
                extras_set = set(extras.rstrip("]").split(",")) - {""}
                assert extras_set <= set(PROJECT.get("optional-dependencies", {})), extras_set
                assert not extras_set & {"dev"}, "test tools do not belong in the image"
                project_installs += 1
            else:
                name = canonicalize_name(Requirement(tok).name)
                assert name in DEPENDENCIES, f"{tok} is not a pyproject dependency"
    assert project_installs == 1


def test_constraints_only_pin_pyproject_dependencies_within_their_ranges() -> None:
    (writer,) = [rest for kind, rest in DOCKERFILE if kind == "RUN" and "/tmp/constraints.txt" in rest
                 and ">" in rest]
    _, fmt, rest = writer.split("'", 2)
    pins = [line.removesuffix("==%s") for line in fmt.split("\\n") if line]
    values = shlex.split(rest.split(">")[0])
    assert len(pins) == len(values) >= 2
    for name, value in zip(pins, values):
        requirement = DEPENDENCIES.get(canonicalize_name(name))
        assert requirement is not None, f"{name} is pinned but is no pyproject dependency"
        version = expand(value)
        assert requirement.specifier.contains(Version(version)), f"{name}=={version} outside {requirement}"


def test_cuda_base_matches_the_torch_build() -> None:
    args = arg_defaults()
    froms = [expand(rest).split()[0] for kind, rest in DOCKERFILE if kind == "FROM"]
    cuda_bases = [f for f in froms if f.startswith("nvidia/cuda:")]
    assert cuda_bases and "runtime" in cuda_bases[0] and "devel" not in cuda_bases[0]
    major, minor = args["CUDA_VERSION"].split(".")[:2]
    assert args["TORCH_CUDA"] == f"cu{major}{minor}"
    torch_install = [a for a in pip_installs() if "torch" in a]
    assert torch_install and any("download.pytorch.org/whl/${TORCH_CUDA}" in t for t in torch_install[0])
    # the final image derives from the CUDA runtime stage, not from the build stage
    final_from = stages()[-1][0][1].split()
    assert final_from[0] == "base" and froms[0].startswith("nvidia/cuda:")


def test_runs_as_a_numeric_non_root_user_the_manifests_agree_on() -> None:
    users = [rest for kind, rest in stages()[-1] if kind == "USER"]
    assert users, "the final stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, "USER must be a numeric non-root uid (runAsNonRoot checks it)"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    assert any(f"--uid {uid}" in rest for kind, rest in stages()[-1] if kind == "RUN")
    values = yaml.safe_load((REPO / "helm/qbert-stack/values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    raycluster = yaml.safe_load((REPO / "k8s/base/raycluster.yaml").read_text())
    assert raycluster["spec"]["headGroupSpec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)


def test_no_credentials_baked_in() -> None:
    secretish = re.compile(r"(KEY|SECRET|TOKEN|PASSW|CREDENTIAL)", re.I)
    for kind, rest in DOCKERFILE:
        if kind in {"ARG", "ENV"}:
            for name in re.findall(r"(\w+)=", rest) or [rest.split()[0]]:
                assert not secretish.search(name), f"{kind} {name} looks like a credential"
    text = (REPO / "Dockerfile").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".env", ".git", "*.pem"} <= set(ignored)


def test_oci_labels() -> None:
    labels = " ".join(rest for kind, rest in stages()[-1] if kind == "LABEL")
    found = dict(re.findall(r"(org\.opencontainers\.image\.[a-z]+)=\"([^\"]*)\"", labels))
    for key in ("title", "version", "revision", "created", "source", "licenses"):
        assert f"org.opencontainers.image.{key}" in found, key
    assert found["org.opencontainers.image.version"] == "${VERSION}"
    assert arg_defaults()["VERSION"] == PROJECT["version"]
    assert found["org.opencontainers.image.licenses"] == PROJECT["license"]["text"]


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    parts = Path(rel).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        pat = pat.rstrip("/")
        for cand in candidates:
            if fnmatch.fnmatch(cand, pat) or (pat.startswith("**/") and fnmatch.fnmatch(Path(cand).name, pat[3:])):
                return True
    return False


@pytest.mark.parametrize("source", sorted(copy_destinations()))
def test_copied_sources_exist_and_are_not_dockerignored(source: str) -> None:
    patterns = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert (REPO / source).exists(), f"COPY {source}: missing in the build context"
    assert not _dockerignored(source, patterns), f"COPY {source} is excluded by .dockerignore"


def test_ray_job_entrypoints_land_where_the_rayjobs_call_them() -> None:
    assert copy_destinations()["ray_jobs"] == "/app/ray_jobs"
    job = yaml.safe_load((REPO / "k8s/jobs/pretrain.yaml").read_text())
    assert job["spec"]["entrypoint"].split()[1].startswith("/app/ray_jobs/")
    workdir = [rest for kind, rest in stages()[-1] if kind == "WORKDIR"]
    assert workdir == ["/app"]
