#!/usr/bin/env bash
# Lints and scans infra/lambda.template.json (cfn-lint, checkov offline), then deploys it into
# moto's CloudFormation to prove it is deployable. Needs `scripts/emulators.sh up` (for the venv
# and the moto endpoint in LAMBDA_TEST_S3_ENDPOINT).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LAMBDA_EMU_VENV:-$HOME/.cache/lambda-emulators/venv}
tpl=infra/lambda.template.json

echo "cfn-lint $tpl"
"$venv/bin/cfn-lint" "$tpl"

echo "checkov $tpl (offline)"
BC_SKIP_MAPPING=TRUE CHECKOV_RUN_SCA_PACKAGE_SCAN_V2=false "$venv/bin/checkov" -f "$tpl" --framework cloudformation \
  --skip-download --quiet --compact --output cli 2>/dev/null

if [ -n "${LAMBDA_TEST_S3_ENDPOINT:-}" ]; then
  echo "deploying $tpl into moto CloudFormation at $LAMBDA_TEST_S3_ENDPOINT"
  AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1 \
  "$venv/bin/python" - "$tpl" "$LAMBDA_TEST_S3_ENDPOINT" <<'PY'
import json, sys, time, boto3
tpl, endpoint = sys.argv[1], sys.argv[2]
cf = boto3.client("cloudformation", endpoint_url=endpoint)
name = f"lambda-infra-{int(time.time() * 1000)}"
cf.create_stack(StackName=name, TemplateBody=open(tpl).read(), Capabilities=["CAPABILITY_NAMED_IAM"],
                Parameters=[{"ParameterKey": "Prefix", "ParameterValue": "ci" + name[-6:]}])
deadline = time.time() + 60
while True:
    s = cf.describe_stacks(StackName=name)["Stacks"][0]
    if s["StackStatus"].endswith("COMPLETE") or s["StackStatus"].endswith("FAILED") or time.time() > deadline:
        break
    time.sleep(0.5)
resources = cf.list_stack_resources(StackName=name)["StackResourceSummaries"]
bad = [r for r in resources if r["ResourceStatus"] != "CREATE_COMPLETE"]
print(f"  stack {name}: {s['StackStatus']}, {len(resources)} resources")
for r in bad:
    print(f"  {r['LogicalResourceId']} {r['ResourceType']}: {r['ResourceStatus']} {r.get('ResourceStatusReason', '')}")
expected = len(json.load(open(tpl))["Resources"])
if s["StackStatus"] != "CREATE_COMPLETE" or bad or len(resources) != expected:
    sys.exit(f"deployment into moto failed: {s['StackStatus']}, {len(resources)}/{expected} resources")
PY
fi
