"""costopt: cut the cost of serving an LLM and keep its quality.

The library shared by the pipeline (Airflow) and serving (KServe) environments: settings, model
loading, quantization schemes, quality metrics, cost model and the artifact layout. It imports
neither Airflow nor KServe."""

__version__ = "0.1.0"
