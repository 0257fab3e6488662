"""gradad.benchmarks"""
