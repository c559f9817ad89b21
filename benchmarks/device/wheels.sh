#!/usr/bin/env bash
# Wheels for the CUDA checks on a GPU machine that has no network (Python 3.12, x86-64 Linux,
# torch with CUDA, triton, accelerate, numpy/pandas/pyarrow and the like already there), in two
# sets that each travel in one call (the device tool carries 64 MiB):
#   .whl/a  localforge's torch path, TRL and Liger at the versions this checkout is tested with
#   .whl/b  Unsloth, which pins transformers <= 5.17 (the GPU machine's own), trl <= 1.15 and
#           datasets < 5; localforge runs on it too, so a call can bridge the two sets
# Two wheels of set b are cut to what the checks load: bitsandbytes (Unsloth imports it) keeps
# only the library for the card's CUDA (BNB_CUDA, 130: torch cu130), and unsloth loses its
# studio/ (a web app, 90% of the wheel).
# Run here, with network:  bash benchmarks/device/wheels.sh      then see cuda.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PY:-.venv/bin/python}
BNB_CUDA=${BNB_CUDA:-130}
platforms=(--platform any --platform manylinux2014_x86_64)
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done

# needs of localforge (pyproject) and of its torch path that the GPU machine lacks or has older
common=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
        referencing==0.37.0 rpds-py==2026.9.1 platformdirs==4.14.9 openai==3.63.0 jiter==0.19.0
        distro==1.9.0 sniffio==1.3.1 httpx2==2.17.0 httpcore2==2.17.0 ollama==0.6.3
        json-repair==0.64.9 rapidfuzz==3.14.6 peft==0.22.0 dill==0.4.1 multiprocess==0.70.19
        click==8.5.1 typer==0.27.3 rich==15.0.0 tomlkit==0.15.3 truststore==0.10.5)
set_a=(transformers==5.25.0 huggingface-hub==2.5.0 kernels==0.19.1 trl==1.16.0 datasets==5.2.0
       liger-kernel==0.8.5)
set_b=(unsloth==2026.10.9 unsloth-zoo==2026.10.9 trl==1.15.0 datasets==4.8.4 tyro==1.0.17
       docstring-parser==0.18.0 typeguard==4.6.1 shtab==1.13.0 msgspec==0.23.0 hf-transfer==0.1.9
       bitsandbytes==0.50.2 torchao==0.18.0 cut-cross-entropy==25.1.1 json5==0.17.3
       nest-asyncio==1.6.0 structlog==26.1.0 diffusers==0.42.1)

fetch() {  # fetch DIR PACKAGE...
    local dir=$1; shift
    rm -rf "$dir" && mkdir -p "$dir"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$dir" "$@" 2>&1 | grep -v "is ignored: it is neither" || true
    [ "$(ls "$dir" | wc -l)" -eq "$#" ] || { echo "wheels.sh: $dir holds $(ls "$dir" | wc -l) wheels, expected $#" >&2; exit 1; }
}
fetch .whl/a "${common[@]}" "${set_a[@]}"
fetch .whl/b "${common[@]}" "${set_b[@]}"
(cd .whl/b
 zip -q -d bitsandbytes-*.whl $(unzip -Z1 bitsandbytes-*.whl | grep -E 'libbitsandbytes_(cuda|rocm)[0-9]+\.so$' \
                                | grep -v "cuda${BNB_CUDA}\.so")
 zip -q -d unsloth-2*.whl 'studio/*')
for d in .whl/a .whl/b; do
    size=$(du -sm "$d" | cut -f1)
    echo "$d: $(ls "$d" | wc -l) wheels, ${size} MiB"
    [ "$size" -le 60 ] || { echo "wheels.sh: $d is over 60 MiB, which with the checkout overruns the 64 MiB a call carries" >&2; exit 1; }
done
