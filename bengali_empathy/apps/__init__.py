"""Apps: the web page and the benchmark."""
