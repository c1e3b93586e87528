#!/usr/bin/env python3
"""Writes a one-layer OCI image layout from host files, with no container engine.

    oci_image.py LAYOUT_DIR TAG --file SRC:DEST[:MODE] ... [--binary SRC:DEST[:MODE]] ...
                 [--dir DEST[:MODE]] ...
                 [--text DEST:MODE:CONTENT] [--entrypoint JSON] [--cmd JSON] [--user U]
                 [--env K=V] ... [--label K=V] ... [--symlink DEST:TARGET] ...

The layer is deterministic (sorted entries, mtime 0, uid/gid 0, gzip without a timestamp), so
the same inputs give the same digests. Parent directories are created 0755. Prints the
manifest digest. Used by scripts/image.sh (larder's image) and the cluster end-to-end suite
(its test images).
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("layout")
    p.add_argument("tag")
    p.add_argument("--file", action="append", default=[], help="SRC:DEST[:MODE] (octal)")
    p.add_argument(
        "--binary",
        action="append",
        default=[],
        help="SRC:DEST[:MODE]: an executable and every shared library ldd says it loads",
    )
    p.add_argument("--dir", action="append", default=[], help="DEST[:MODE] (octal)")
    p.add_argument("--text", action="append", default=[], help="DEST:MODE:CONTENT")
    p.add_argument("--symlink", action="append", default=[], help="DEST:TARGET")
    p.add_argument("--entrypoint", default=None, help="JSON list")
    p.add_argument("--cmd", default=None, help="JSON list")
    p.add_argument("--user", default=None)
    p.add_argument("--workdir", default="/")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--label", action="append", default=[])
    p.add_argument("--arch", default="amd64")
    return p.parse_args(argv)


def norm(dest):
    dest = dest.strip("/")
    if not dest or ".." in dest.split("/"):
        raise SystemExit(f"bad destination path: {dest!r}")
    return dest


def tar_info(name, kind, mode, size=0):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def shared_libraries(binary):
    """The shared objects `binary` loads (the dynamic loader included), as paths on this
    machine; none for a static binary."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    paths = set()
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts:
            target = parts[parts.index("=>") + 1]
            if target.startswith("/"):
                paths.add(target)
        elif parts and parts[0].startswith("/"):
            paths.add(parts[0])
    return sorted(paths)


def build_layer(args):
    """Returns the uncompressed tar bytes of the one layer."""
    entries = {}  # path -> (TarInfo, bytes | None)

    def add_parents(path):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            entries.setdefault(d, (tar_info(d, tarfile.DIRTYPE, 0o755), None))

    for spec in args.dir:
        dest, _, mode = spec.partition(":")
        dest = norm(dest)
        add_parents(dest)
        entries[dest] = (tar_info(dest, tarfile.DIRTYPE, int(mode or "755", 8)), None)
    for spec in args.binary:
        src = spec.split(":")[0]
        args.file.append(spec)
        for lib in shared_libraries(src):
            args.file.append(f"{os.path.realpath(lib)}:{lib}:0755")
    for spec in args.file:
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise SystemExit(f"--file wants SRC:DEST[:MODE], got {spec!r}")
        src, dest = parts[0], norm(parts[1])
        with open(src, "rb") as f:
            data = f.read()
        mode = int(parts[2], 8) if len(parts) == 3 else (os.stat(src).st_mode & 0o777)
        add_parents(dest)
        entries[dest] = (tar_info(dest, tarfile.REGTYPE, mode, len(data)), data)
    for spec in args.text:
        dest, mode, content = spec.split(":", 2)
        dest = norm(dest)
        data = content.encode()
        add_parents(dest)
        entries[dest] = (tar_info(dest, tarfile.REGTYPE, int(mode, 8), len(data)), data)
    for spec in args.symlink:
        dest, target = spec.split(":", 1)
        dest = norm(dest)
        add_parents(dest)
        info = tar_info(dest, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        entries[dest] = (info, None)

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(entries):
            info, data = entries[name]
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def write_blob(layout, data):
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(layout, "blobs", "sha256", digest)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return f"sha256:{digest}", len(data)


def kv(items):
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"want K=V, got {item!r}")
        out[k] = v
    return out


def main(argv):
    args = parse_args(argv)
    raw = build_layer(args)
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, compresslevel=6) as g:
        g.write(raw)
    layer = gz.getvalue()

    os.makedirs(args.layout, exist_ok=True)
    layer_digest, layer_size = write_blob(args.layout, layer)
    config = {
        "architecture": args.arch,
        "os": "linux",
        "config": {"Env": args.env, "WorkingDir": args.workdir, "Labels": kv(args.label)},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
        "history": [{"created_by": "larder scripts/oci_image.py"}],
    }
    if args.entrypoint:
        config["config"]["Entrypoint"] = json.loads(args.entrypoint)
    if args.cmd:
        config["config"]["Cmd"] = json.loads(args.cmd)
    if args.user:
        config["config"]["User"] = args.user
    config_digest, config_size = write_blob(args.layout, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_size}
        ],
        "annotations": {k: v for k, v in kv(args.label).items() if k.startswith("org.opencontainers.")},
    }
    manifest_digest, manifest_size = write_blob(args.layout, json.dumps(manifest, sort_keys=True).encode())

    index_path = os.path.join(args.layout, "index.json")
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []}
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
    index["manifests"] = [
        m for m in index.get("manifests", []) if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != args.tag
    ]
    index["manifests"].append(
        {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": args.tag},
        }
    )
    with open(index_path, "w") as f:
        json.dump(index, f, sort_keys=True)
    with open(os.path.join(args.layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    print(manifest_digest)


if __name__ == "__main__":
    main(sys.argv[1:])
