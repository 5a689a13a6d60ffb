"""Vendor KubeRay's CRD schemas for tests/infra/test_k8s.py.

    git clone --bare https://github.com/ray-project/kuberay /tmp/kuberay
    python infra/k8s/schema/extract.py --repo /tmp/kuberay --ref v1.6.2

Writes, beside this file, the ``v1`` ``openAPIV3Schema`` of the RayJob and RayCluster CRDs
(``ray-operator/config/crd/bases/ray.io_*.yaml`` at ``--ref``) as ``rayjob.json`` and ``raycluster.json``,
and ``source.json`` naming the tag and commit they came from. The JSON is sorted and indented so that a
version bump reads as a diff.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRDS = {"rayjob": "ray.io_rayjobs.yaml", "raycluster": "ray.io_rayclusters.yaml"}
CRD_DIR = "ray-operator/config/crd/bases"


def git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True, text=True).stdout


def served_schema(crd: dict, version: str = "v1") -> dict:
    """The openAPIV3Schema of ``version`` in a CustomResourceDefinition."""
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise SystemExit(f"{crd['metadata']['name']} has no version {version}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", required=True, help="a KubeRay git repository (clone or bare)")
    parser.add_argument("--ref", required=True, help="a KubeRay release tag, e.g. v1.6.2")
    args = parser.parse_args(argv)
    commit = git(args.repo, "rev-parse", f"{args.ref}^{{commit}}").strip()
    for name, file in CRDS.items():
        crd = yaml.safe_load(git(args.repo, "show", f"{commit}:{CRD_DIR}/{file}"))
        (HERE / f"{name}.json").write_text(json.dumps(served_schema(crd), indent=1, sort_keys=True) + "\n")
    source = {"kuberay": args.ref, "commit": commit, "crds": {k: f"{CRD_DIR}/{v}" for k, v in CRDS.items()},
              "version": "v1"}
    (HERE / "source.json").write_text(json.dumps(source, indent=1) + "\n")


if __name__ == "__main__":
    main()
