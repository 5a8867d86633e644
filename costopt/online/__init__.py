"""What happens after deploy: always-valid sequential tests (`sequential`), the quality-judged canary
(`canary`), A/B tests between serving variants (`abtest`) and drift in the prompts (`drift`). No HTTP
here; the gateway (`serving/gateway/canary.py`) and the `continuous_optimization` DAG use it."""
