"""Benchmark replays through the live gRPC API, and the study of the research questions.

Entry points: ``benchmarks.replay.runner.run_replay`` / ``run_demo_replay`` /
``format_task_table``, ``benchmarks.replay.study.run_study``, and the CLI in ``cli.py``.
"""
