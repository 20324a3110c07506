"""OCI image layouts for the benchmarks (skopeo copies them to a registry).

    from oci_layout import Layout
    out = Layout("/tmp/x")
    desc = out.image([gzipped_layer_bytes, ...], [diff_id, ...], arch="amd64")
    out.tag("latest", desc)                       # or out.tag("latest", out.index([d1, d2]))
"""
import gzip
import hashlib
import io
import json
import os
import tarfile

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def gzip_layer(tar_bytes):
    """(gzipped bytes, diff id) of an uncompressed tar."""
    return gzip.compress(tar_bytes, mtime=0), sha256(tar_bytes)


def tar(entries):
    """An uncompressed tar of (name, data or None for a dir, mode, symlink target or None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data, mode, link in entries:
            info = tarfile.TarInfo(name)
            info.mode = mode
            if link:
                info.type = tarfile.SYMTYPE
                info.linkname = link
                t.addfile(info)
            elif data is None:
                info.type = tarfile.DIRTYPE
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Layout:
    def __init__(self, path):
        self.path = path
        os.makedirs(os.path.join(path, "blobs/sha256"), exist_ok=True)

    def blob(self, data):
        digest = sha256(data)
        with open(os.path.join(self.path, "blobs/sha256", digest[7:]), "wb") as f:
            f.write(data)
        return {"digest": digest, "size": len(data)}

    def image(self, gzipped_layers, diff_ids, arch="amd64", config=None):
        """An image manifest's descriptor (with its platform)."""
        layers = [dict(self.blob(g), mediaType=LAYER) for g in gzipped_layers]
        cfg = {"architecture": arch, "os": "linux", "config": config or {"Env": ["PATH=/bin"]},
               "rootfs": {"type": "layers", "diff_ids": list(diff_ids)}}
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST,
                    "config": dict(self.blob(json.dumps(cfg).encode()),
                                   mediaType="application/vnd.oci.image.config.v1+json"),
                    "layers": layers}
        return dict(self.blob(json.dumps(manifest).encode()), mediaType=MANIFEST,
                    platform={"os": "linux", "architecture": arch})

    def index(self, descriptors):
        index = {"schemaVersion": 2, "mediaType": INDEX, "manifests": descriptors}
        return dict(self.blob(json.dumps(index).encode()), mediaType=INDEX)

    def tag(self, name, descriptor):
        descriptor = {k: v for k, v in descriptor.items() if k != "platform"}
        descriptor["annotations"] = {"org.opencontainers.image.ref.name": name}
        with open(os.path.join(self.path, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": [descriptor]}, f)
        with open(os.path.join(self.path, "oci-layout"), "w") as f:
            f.write('{"imageLayoutVersion":"1.0.0"}')
