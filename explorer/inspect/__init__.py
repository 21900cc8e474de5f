"""What a merge does, measured.

Task-vector sources, one-pass scans, per-tensor tables (pandas), interference and comparison
statistics, and the Inspect figures (plotly).
"""
