"""Write a one-layer OCI image archive from a directory, offline: no registry,
no daemon. ``ctr -n NS images import ARCHIVE`` takes it under ``--name``.

    python3 scripts/oci_image.py ROOTFS --name portrace.test/busybox:1 \\
        --entrypoint /bin/sh -o busybox.tar

Layout: image-spec's image-layout.md (oci-layout, index.json, blobs/sha256);
the layer is an uncompressed tar (``application/vnd.oci.image.layer.v1.tar``),
its digest also the config's ``rootfs.diff_ids``. containerd names the image
by the index entry's ``io.containerd.image.name`` annotation.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"


def _xattrs(path: Path) -> dict[str, str]:
    """A file's extended attributes as PAX records (SCHILY.xattr.NAME, as GNU
    tar and Go's archive/tar write them; containerd sets them when it
    unpacks): file capabilities (security.capability) among them. Values are
    bytes, carried through tarfile as surrogate-escaped text."""
    if not path.is_file() or path.is_symlink():
        return {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {f"SCHILY.xattr.{name}": os.getxattr(path, name, follow_symlinks=False)
            .decode("utf-8", "surrogateescape") for name in names}


def _layer(rootfs: Path) -> bytes:
    """The directory as a tar (owners by number, fixed times, so the same
    tree gives the same digest; extended attributes kept); sockets, which
    tar cannot hold, left out."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tar:
        for path in sorted(rootfs.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(rootfs)))
            if info is None:
                continue
            info.uname = info.gname = ""
            info.mtime = 0
            info.pax_headers = _xattrs(path)
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


def _blob(blobs: dict[str, bytes], data: bytes, media: str) -> dict[str, object]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"mediaType": media, "digest": digest, "size": len(data)}


def write_image(rootfs: Path, name: str, out: Path, entrypoint: Sequence[str] = (),
                cmd: Sequence[str] = (), user: str = "", env: Sequence[str] = ()) -> None:
    """``out``: a tar of the OCI image layout holding one image named ``name``."""
    blobs: dict[str, bytes] = {}
    layer = _blob(blobs, _layer(rootfs), LAYER)
    config = {
        "architecture": ARCH.get(platform.machine(), platform.machine()), "os": "linux",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(0)),
        "config": {"Entrypoint": list(entrypoint) or None, "Cmd": list(cmd) or None,
                   "User": user, "Env": list(env) or ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]},
    }
    cfg = _blob(blobs, json.dumps(config, sort_keys=True).encode(), CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST, "config": cfg, "layers": [layer]}
    entry = _blob(blobs, json.dumps(manifest, sort_keys=True).encode(), MANIFEST)
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    entry["annotations"] = {"io.containerd.image.name": name,
                            "org.opencontainers.image.ref.name": tag}
    index = {"schemaVersion": 2, "manifests": [entry]}
    files = {"oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
             "index.json": json.dumps(index).encode()}
    files.update({f"blobs/sha256/{d.split(':', 1)[1]}": data for d, data in blobs.items()})
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rootfs", type=Path)
    ap.add_argument("--name", required=True, help="the image's name, e.g. portrace:0.1")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--entrypoint", nargs="*", default=[])
    ap.add_argument("--cmd", nargs="*", default=[])
    ap.add_argument("--user", default="")
    a = ap.parse_args()
    write_image(a.rootfs, a.name, a.output, a.entrypoint, a.cmd, a.user)


if __name__ == "__main__":
    main()
