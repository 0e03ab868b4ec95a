"""Our extra_args fields (task, SLOs) are checked only once offload is on in the
process: with it off the plugin is inert, and plain vLLM takes any vllm_xargs."""

import pytest


def test_request_fields_are_checked_only_with_offload_on(monkeypatch):
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    from vllm_moe_offload.integration.vllm import tasks

    tasks.install_request_validation()
    monkeypatch.setattr(tasks, "_validating", False)
    SamplingParams(max_tokens=4, extra_args={"task": "", "slo_ttft_ms": 0})  # plain vLLM's
    tasks.validate_requests()
    with pytest.raises(VLLMValidationError, match="slo_ttft_ms"):
        SamplingParams(max_tokens=4, extra_args={"slo_ttft_ms": 0})
    SamplingParams(max_tokens=4, extra_args={"task": "python", "slo_ttft_ms": 500})
