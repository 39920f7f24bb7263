"""One module of benchmark cases per op family: gaussian, mixture, overhead."""
