#!/usr/bin/env bash
# Offline validation of the Kubernetes manifests under deploy/ (issue 7).
#
#   bash tests/validate-deploy.sh
#
# 1. Every document of every deploy/**/*.yaml against the Kubernetes OpenAPI schemas shipped by
#    the PyPI package kubernetes-validate, in strict mode (unknown fields are errors), for each
#    Kubernetes version in K8S_VERSIONS. A kind with no schema is an ERROR here (the
#    kubernetes-validate CLI would only warn), except the CRD kinds in CRD_SCHEMAS below, which
#    are checked against a schema transcribed from their upstream CRD.
# 2. The output of `kubectl kustomize deploy/` (when kubectl is on PATH), the same way.
# 3. Every ```yaml block of docs/kubernetes.md, the same way as 1 (so every block is a whole
#    manifest). A block whose first line is `# From deploy/examples/X.yaml` must hold only
#    documents that X holds, so the page and the files cannot drift apart.
# 4. Policy: images pinned (a tag other than latest, or a digest); resource requests on every
#    container; the CSI socket the plugin serves is the one every sidecar dials; the kubelet
#    root agrees across the node DaemonSet; names agree (driver, ServiceAccounts, roles, Secret,
#    and every storageClassName / volumeSnapshotClassName of the docs and deploy/examples is a
#    class defined under deploy/); every StorageClass parameter key of deploy/ and the docs is a
#    row of the parameter table in docs/kubernetes.md (or a csi.storage.k8s.io/ key the
#    sidecars read), with a value the driver accepts.
# Needs network only to install kubernetes-validate the first time.
set -euo pipefail
cd "$(dirname "$0")/.."

KV_VERSION=1.37.0
# 1.34: the oldest release the pinned sidecars support (csi-provisioner v6 needs 1.34);
# 1.37: the newest schema kubernetes-validate $KV_VERSION ships.
K8S_VERSIONS="1.34 1.37"

if ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "installing kubernetes-validate==$KV_VERSION"
  python3 -m pip install --quiet "kubernetes-validate==$KV_VERSION"
fi

rendered=""
if command -v kubectl >/dev/null 2>&1; then
  rendered=$(mktemp)
  trap 'rm -f "$rendered"' EXIT
  kubectl kustomize deploy/ >"$rendered"
else
  echo "SKIP kubectl kustomize deploy/ (no kubectl on PATH)"
fi

K8S_VERSIONS="$K8S_VERSIONS" RENDERED="$rendered" python3 - <<'PY'
import glob, os, re, sys
import yaml
import kubernetes_validate
import kubernetes_validate.utils as kv
import jsonschema
from referencing import Registry, Resource

versions = os.environ["K8S_VERSIONS"].split()
errors = []
def err(where, msg):
    errors.append(f"{where}: {msg}")
    print(f"ERROR {where}: {msg}")

# --- CRD kinds: not in kubernetes-validate's built-in schemas -------------------------------
# VolumeSnapshotClass, from external-snapshotter's
# client/config/crd/snapshot.storage.k8s.io_volumesnapshotclasses.yaml (v1): driver and
# deletionPolicy required, parameters a string map, nothing else; metadata is checked with
# Kubernetes' own ObjectMeta schema.
OBJECT_META = {"$ref": "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
CRD_SCHEMAS = {
    # VolumeSnapshot, from snapshot.storage.k8s.io_volumesnapshots.yaml (v1): spec.source
    # required, with exactly one of persistentVolumeClaimName (a new snapshot of a claim) and
    # volumeSnapshotContentName (a pre-provisioned content); volumeSnapshotClassName optional.
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshot"): {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://kubernetes.io/api/volumesnapshot-snapshot-v1.json",
        "type": "object",
        "required": ["apiVersion", "kind", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "snapshot.storage.k8s.io/v1"},
            "kind": {"const": "VolumeSnapshot"},
            "metadata": OBJECT_META,
            "spec": {
                "type": "object",
                "required": ["source"],
                "additionalProperties": False,
                "properties": {
                    "volumeSnapshotClassName": {"type": "string"},
                    "source": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "persistentVolumeClaimName": {"type": "string"},
                            "volumeSnapshotContentName": {"type": "string"},
                        },
                        "oneOf": [
                            {"required": ["persistentVolumeClaimName"]},
                            {"required": ["volumeSnapshotContentName"]},
                        ],
                    },
                },
            },
            "status": {"type": "object"},
        },
    },
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"): {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://kubernetes.io/api/volumesnapshotclass-snapshot-v1.json",
        "type": "object",
        "required": ["apiVersion", "kind", "driver", "deletionPolicy"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "snapshot.storage.k8s.io/v1"},
            "kind": {"const": "VolumeSnapshotClass"},
            "metadata": OBJECT_META,
            "driver": {"type": "string", "minLength": 1},
            "deletionPolicy": {"enum": ["Delete", "Retain"]},
            "parameters": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
}

def validate_crd(doc, version):
    d = os.path.dirname(kubernetes_validate.__file__)
    defs = kv.schema_contents(f"kubernetes-json-schema/v{version}.0-local-strict/_definitions.json", version)
    schema = CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])]
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    jsonschema.validators.Draft202012Validator(schema, registry=registry).validate(doc)

def load(path, text=None):
    text = open(path).read() if text is None else text
    return [d for d in yaml.safe_load_all(text) if d]

def check_schema(where, doc):
    name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    for v in versions:
        try:
            if (doc.get("apiVersion"), doc.get("kind")) in CRD_SCHEMAS:
                validate_crd(doc, v)
            else:
                kv.validate(doc, v, strict=True)
        except (kv.ValidationError, jsonschema.ValidationError) as e:
            err(where, f"{name} (k8s {v}) at {'.'.join(map(str, e.path)) or '<root>'}: {e.message}")
        except kv.SchemaNotFoundError as e:
            err(where, f"{name}: {e.message} (add a schema to CRD_SCHEMAS if it is a CRD)")

files = sorted(f for f in glob.glob("deploy/**/*.yaml", recursive=True)
               if os.path.basename(f) != "kustomization.yaml")
all_docs = []  # (file, doc) of the raw files
for f in files:
    for doc in load(f):
        check_schema(f, doc)
        all_docs.append((f, doc))

# --- kustomization: lists every top-level manifest; its rendering validates too -----------
kust = load("deploy/kustomization.yaml")[0]
listed = set(kust["resources"])
present = {os.path.basename(f) for f in files if os.path.dirname(f) == "deploy"}
for missing in sorted(present - listed):
    err("deploy/kustomization.yaml", f"{missing} is not in resources")
for extra in sorted(listed - present):
    err("deploy/kustomization.yaml", f"resources lists {extra}, which does not exist")
rendered_docs = []
if os.environ.get("RENDERED"):
    rendered_docs = load(os.environ["RENDERED"])
    for doc in rendered_docs:
        check_schema("kubectl kustomize deploy/", doc)

# --- docs/kubernetes.md: every ```yaml block is a manifest ----------------------------------
DOC = "docs/kubernetes.md"
doc_text = open(DOC).read()
doc_docs = []  # (where, doc) of the page's yaml blocks
blocks = 0
in_block, start, buf = False, 0, []
for no, line in enumerate(doc_text.splitlines(), 1):
    if not in_block and line.strip() == "```yaml":
        in_block, start, buf = True, no + 1, []
    elif in_block and line.strip() == "```":
        in_block = False
        blocks += 1
        where = f"{DOC}:{start}"
        try:
            docs = load(None, "\n".join(buf))
        except yaml.YAMLError as e:
            err(where, f"yaml block does not parse: {e}")
            continue
        if not docs:
            err(where, "empty yaml block")
        for doc in docs:
            if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
                err(where, "a yaml block must hold whole manifests (apiVersion, kind)")
                continue
            check_schema(where, doc)
            doc_docs.append((where, doc))
        m = re.match(r"#\s*From (deploy/\S+\.yaml)\s*$", buf[0]) if buf else None
        if m:
            if not os.path.exists(m.group(1)):
                err(where, f"quotes {m.group(1)}, which does not exist")
            else:
                theirs = load(m.group(1))
                for doc in docs:
                    if doc not in theirs:
                        err(where, f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')} "
                                   f"differs from every document of {m.group(1)}")
    elif in_block:
        buf.append(line)
if in_block:
    err(f"{DOC}:{start}", "unterminated yaml block")

# --- policy -------------------------------------------------------------------------------
def pod_specs(doc):
    spec = doc.get("spec") or {}
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        yield spec["template"]["spec"]
    elif doc["kind"] == "CronJob":
        yield spec["jobTemplate"]["spec"]["template"]["spec"]
    elif doc["kind"] == "Pod":
        yield spec

def expand(s, env):
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), s)

def flag(args, name):
    for a in args:
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None

def mount_for(container, path):
    """The volumeMount whose mountPath is the longest prefix of path."""
    best = None
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best["mountPath"].rstrip("/")):
                best = m
    return best

def where_on_volume(container, path):
    m = mount_for(container, path)
    if m is None:
        return None
    rest = path[len(m["mountPath"].rstrip("/")):].lstrip("/")
    return (m["name"], "/".join(p for p in (m.get("subPath", ""), rest) if p))

by_kind = {}
for f, doc in all_docs:
    by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = (f, doc)
configmaps = {n: d for n, (_, d) in by_kind.get("ConfigMap", {}).items()}

images = 0
for f, doc in all_docs + doc_docs:
    for ps in pod_specs(doc):
        where = f"{f} {doc['kind']}/{doc['metadata']['name']}"
        cs = ps.get("initContainers", []) + ps["containers"]
        for c in cs:
            images += 1
            img = c["image"]
            tag = img.rsplit("/", 1)[-1]
            if "@sha256:" not in img and (":" not in tag or tag.endswith(":latest")):
                err(where, f"container {c['name']}: image {img} is not pinned to a tag or digest")
            req = (c.get("resources") or {}).get("requests") or {}
            if not {"cpu", "memory"} <= set(req):
                err(where, f"container {c['name']}: resources.requests needs cpu and memory")
        sa = ps.get("serviceAccountName")
        if doc["metadata"].get("namespace") == "cairn-system" and sa not in by_kind.get("ServiceAccount", {}):
            err(where, f"serviceAccountName {sa!r} is not defined under deploy/")

        # CSI sockets: the cairn csi container's --endpoint, seen through its volume, must be
        # the --csi-address of every sidecar, seen through theirs.
        plugin = next((c for c in cs if c.get("args", [])[:1] == ["csi"]), None)
        if plugin is None:
            continue
        ep = flag(plugin["args"], "--endpoint")
        if not ep or not ep.startswith("unix://"):
            err(where, "cairn csi needs --endpoint=unix:///...")
            continue
        sock = where_on_volume(plugin, ep[len("unix://"):])
        if sock is None:
            err(where, f"cairn csi endpoint {ep} is on no volume the sidecars can share")
            continue
        for c in cs:
            if c is plugin:
                continue
            env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
            addr = flag([expand(a, env) for a in c.get("args", [])], "--csi-address")
            if addr is None:
                err(where, f"sidecar {c['name']} has no --csi-address")
            elif where_on_volume(c, addr) != sock:
                err(where, f"sidecar {c['name']} dials {addr} = {where_on_volume(c, addr)}, "
                           f"the plugin serves {sock}")
        lp = next((c for c in cs if "livenessprobe" in c["image"]), None)
        port = flag(lp["args"], "--health-port") if lp else None
        probe_port = (plugin.get("livenessProbe") or {}).get("httpGet", {}).get("port")
        named = {p["name"]: p["containerPort"] for p in plugin.get("ports", [])}
        if port is None or str(named.get(probe_port, probe_port)) != port:
            err(where, f"cairn csi livenessProbe port {probe_port} is not livenessprobe's --health-port {port}")

        # Node plugin: kubelet root in one ConfigMap, and everything else agrees with it.
        reg = next((c for c in cs if "csi-node-driver-registrar" in c["image"]), None)
        if reg is None:
            continue
        env = {}
        for e in reg.get("env", []):
            ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
            env[e["name"]] = configmaps[ref["name"]]["data"][ref["key"]] if ref else e.get("value", "")
        root = env.get("KUBELET_ROOT")
        if root is None:
            err(where, "node-driver-registrar should read KUBELET_ROOT from the ConfigMap")
            continue
        vols = {v["name"]: v for v in ps["volumes"]}
        kd = next((m for m in plugin["volumeMounts"] if m.get("mountPropagation") == "Bidirectional"), None)
        if kd is None or kd["mountPath"] != root or vols[kd["name"]]["hostPath"]["path"] != root:
            err(where, f"kubelet root {root} (ConfigMap) must be the hostPath and the Bidirectional "
                       f"mountPath of the plugin's kubelet volume")
            continue
        regpath = flag([expand(a, env) for a in reg["args"]], "--kubelet-registration-path")
        if sock != (kd["name"], regpath[len(root):].lstrip("/")) if regpath and regpath.startswith(root + "/") else True:
            err(where, f"--kubelet-registration-path {regpath} is not the plugin socket {sock} on the host")
        if where_on_volume(reg, "/registration") != (kd["name"], "plugins_registry"):
            err(where, "node-driver-registrar's /registration must be <kubelet root>/plugins_registry")
        if regpath and "/plugins/csi.cairn.io/" not in regpath:
            err(where, f"the plugin socket should live in <kubelet root>/plugins/csi.cairn.io, not {regpath}")

# Names that must agree across files.
drivers = set(by_kind.get("CSIDriver", {}))
for n, (f, d) in by_kind.get("VolumeSnapshotClass", {}).items():
    if d["driver"] not in drivers:
        err(f, f"VolumeSnapshotClass {n}: driver {d['driver']} is no CSIDriver here")
    secret = d.get("parameters", {}).get("csi.storage.k8s.io/snapshotter-secret-name")
    if secret:
        if secret not in by_kind.get("Secret", {}):
            err(f, f"VolumeSnapshotClass {n}: Secret {secret} is not defined")
        role_ok = any(r.get("resources") == ["secrets"] and secret in r.get("resourceNames", [])
                      for _, (_, ro) in by_kind.get("Role", {}).items() for r in ro["rules"])
        if not role_ok:
            err(f, f"VolumeSnapshotClass {n}: no Role grants get on Secret {secret}")
def secret_readable(secret, namespace):
    """Whether Secret `secret` is defined under deploy/ and a Role there grants get on it."""
    defined = any(d["metadata"].get("namespace") == namespace
                  for f, d in all_docs if d["kind"] == "Secret" and d["metadata"]["name"] == secret)
    role = any(ro["metadata"].get("namespace") == namespace and r.get("resources") == ["secrets"]
               and secret in r.get("resourceNames", []) and "get" in r.get("verbs", [])
               for f, ro in all_docs if ro["kind"] == "Role" for r in ro["rules"])
    return defined, role

# StorageClass parameters: the keys the table of docs/kubernetes.md lists, values as the driver
# parses them (crates/cairn/src/csi/mod.rs, Params::parse).
section = re.search(r"^## StorageClass parameters\n(.*?)^## ", doc_text, re.S | re.M)
table_keys = set()
if section is None:
    err(DOC, "no '## StorageClass parameters' section")
else:
    for row in re.findall(r"^\|\s*`([^`]+)`\s*\|", section.group(1), re.M):
        table_keys.add(row)
    if not table_keys:
        err(DOC, "the StorageClass parameters section has no table rows")
SIDECAR_KEYS = {f"csi.storage.k8s.io/{op}-secret-{x}"
                for op in ("provisioner", "controller-publish", "node-stage", "node-publish",
                           "controller-expand", "node-expand")
                for x in ("name", "namespace")}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
PARAM_VALUES = {
    "numberOfReplicas": lambda v: v.isdigit() and 1 <= int(v) <= 16,
    "dataLocality": lambda v: v in ("disabled", "best-effort"),
    "staleReplicaTimeout": lambda v: bool(re.fullmatch(r"[0-9]+|([0-9]+\s*[a-z]+\s*)+", v)),
    "fromBackup": lambda v: bool(DNS_LABEL.match(v)),
    "backupTarget": lambda v: bool(re.match(r"^(s3://[^/]+(/.*)?|file:///.*)$", v)),
    "csi.storage.k8s.io/fstype": lambda v: v in ("ext4", "xfs"),
}
for where, d in [(f, d) for f, d in all_docs] + doc_docs:
    if d["kind"] == "StorageClass":
        n = d["metadata"]["name"]
        if d["provisioner"] not in drivers:
            err(where, f"StorageClass {n}: provisioner {d['provisioner']} is no CSIDriver here")
        params = d.get("parameters") or {}
        for k, v in params.items():
            if k not in table_keys and k not in SIDECAR_KEYS:
                err(where, f"StorageClass {n}: parameter {k} is not in the table of {DOC}")
            elif k in PARAM_VALUES and not PARAM_VALUES[k](str(v)):
                err(where, f"StorageClass {n}: {k}: {v!r} is not a value the driver accepts")
        secret = params.get("csi.storage.k8s.io/provisioner-secret-name")
        if secret:
            ns = params.get("csi.storage.k8s.io/provisioner-secret-namespace")
            defined, role = secret_readable(secret, ns)
            if not defined:
                err(where, f"StorageClass {n}: Secret {ns}/{secret} is not defined under deploy/")
            if not role:
                err(where, f"StorageClass {n}: no Role in {ns} grants get on Secret {secret}")
    if d["kind"] == "VolumeSnapshotClass":
        p = d.get("parameters") or {}
        t = p.get("type", "snap")
        if t not in ("snap", "backup"):
            err(where, f"VolumeSnapshotClass {d['metadata']['name']}: type {t!r} is not snap or backup")
        elif t == "backup" and not re.match(r"^(s3://[^/]+(/.*)?|file:///.*)$", p.get("target", "")):
            err(where, f"VolumeSnapshotClass {d['metadata']['name']}: type backup needs "
                       f"target s3://bucket/prefix or file:///dir")

# Class names used by the docs and the examples must be classes deploy/ defines.
classes = {"storageClassName": set(by_kind.get("StorageClass", {})),
           "volumeSnapshotClassName": set(by_kind.get("VolumeSnapshotClass", {}))}
def class_refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k in classes and isinstance(v, str):
                yield k, v
            else:
                yield from class_refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from class_refs(v)
uses = doc_docs + [(f, d) for f, d in all_docs if f.startswith("deploy/examples/")]
for where, d in uses:
    for k, v in class_refs(d):
        if v not in classes[k]:
            err(where, f"{d['kind']}/{d['metadata'].get('name')}: {k} {v} is not defined under deploy/")

for kind in ("ClusterRoleBinding", "RoleBinding"):
    for n, (f, d) in by_kind.get(kind, {}).items():
        if d["roleRef"]["name"] not in by_kind.get(d["roleRef"]["kind"], {}):
            err(f, f"{kind} {n}: {d['roleRef']['kind']} {d['roleRef']['name']} is not defined")
        for s in d["subjects"]:
            if s["kind"] == "ServiceAccount" and s["name"] not in by_kind.get("ServiceAccount", {}):
                err(f, f"{kind} {n}: ServiceAccount {s['name']} is not defined")

print(f"\nkubernetes-validate {kubernetes_validate.__version__}, Kubernetes {', '.join(versions)} "
      f"(strict): {len(files)} files, {len(all_docs)} documents"
      + (f", {len(rendered_docs)} rendered by kustomize" if rendered_docs else "")
      + f"; {DOC}: {blocks} yaml blocks, {len(doc_docs)} documents"
      + f"; {len(CRD_SCHEMAS)} CRD kind(s) checked with a transcribed schema; {images} containers")
if errors:
    print(f"FAILED: {len(errors)} error(s)")
    sys.exit(1)
print(f"deploy/ and {DOC}: all manifests valid")
PY
