#!/usr/bin/env bash
# Wheels the GPU machine's image lacks (Python 3.12 there), into .whl/ (git-ignored via .git/info/exclude),
# carried with the device call: the server (fastapi, uvicorn, uvloop, httptools, pydantic), the openai client,
# gguf, xgrammar (structured outputs) and py-spy (diagnostics).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  fastapi==0.165.0 uvicorn==0.54.0 starlette==1.10.0 pydantic==2.14.3 pydantic_core==2.50.4 \
  annotated-types==0.8.0 typing-inspection==0.4.5 annotated-doc opentelemetry-api typing_extensions \
  openai==3.54.0 jiter==0.19.0 distro sniffio==1.3.1 httpx2==2.16.2 httpcore2==2.16.2 truststore gguf==0.19.0 \
  uvloop==0.23.0 httptools==0.9.0 py-spy==0.4.3 xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
ls .whl
