"""What the benchmark scripts share: result files and tables (``common``), offline data sets
(``data``) and text corpora (``text``), small models (``models``), and the ports of real LLMs
(``llama``: SmolLM2; ``gemma``: Gemma 3 270M). The scripts are the files in ``benchmarks/``."""
