"""The cost model's CPU-versus-GPU comparison (`costopt.evaluation.cost`) and the GPU price setting."""
import pytest

from costopt.evaluation.cost import Deployment, cheaper_deployment, cost_per_1m_requests, gpu_deployment, served_cost
from costopt.params import ParamsError, load_params, params_from_dict


def test_served_cost_is_the_hourly_price_over_the_requests_an_hour_serves():
    cost = served_cost(Deployment("cpu", 0.10, throughput_req_s=2.0, tokens_per_request=100))
    assert cost["usd_per_1m_requests"] == pytest.approx(0.10 / 3600 / 2.0 * 1e6), cost  # 13.9 USD
    assert cost["usd_per_1m_requests"] == pytest.approx(cost_per_1m_requests(0.10, 0.5)), "same rule as the CPU figure"
    assert cost["usd_per_1m_tokens"] == pytest.approx(cost["usd_per_1m_requests"] / 100), cost


def test_a_gpu_wins_only_when_its_throughput_beats_its_price():
    """3.50 USD/h against 0.10 USD/h: the GPU must serve more than 35x the CPU's requests per second."""
    cpu = Deployment("cpu", 0.10, throughput_req_s=2.0)
    slow_gpu = gpu_deployment("h200", 3.50, throughput_req_s=60.0)  # 30x the CPU: still dearer
    fast_gpu = gpu_deployment("h200", 3.50, throughput_req_s=140.0)  # 70x: half the CPU's cost
    assert cheaper_deployment(cpu, slow_gpu)["cheaper"] == "cpu"
    verdict = cheaper_deployment(cpu, fast_gpu)
    assert verdict["cheaper"] == "h200" and verdict["ratio"] == pytest.approx(2.0), verdict
    assert gpu_deployment("h200x2", 3.50, 140.0, gpus=2).price_per_hour_usd == 7.0, "priced per GPU-hour"


@pytest.mark.parametrize("kwargs,field", [({"throughput_req_s": 0}, "throughput_req_s"),
                                          ({"price_per_hour_usd": -1}, "price_per_hour_usd"),
                                          ({"tokens_per_request": float("nan")}, "tokens_per_request")])
def test_bad_measurements_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        Deployment(**{"name": "x", "price_per_hour_usd": 1.0, "throughput_req_s": 1.0, **kwargs})
    with pytest.raises(ValueError, match="^gpus:"):
        gpu_deployment("x", 3.5, 1.0, gpus=0)


def test_params_carry_the_gpu_hour_price_and_check_it():
    params = load_params("params.yaml")
    assert params.gpu.price_per_hour_usd == 3.50 and params.gpu.card == "H200", params.gpu
    with pytest.raises(ParamsError, match="gpu.price_per_hour_usd"):
        params_from_dict({"gpu": {"price_per_hour_usd": 0}})
    with pytest.raises(ParamsError, match="gpu: unknown key"):
        params_from_dict({"gpu": {"price": 3}})
