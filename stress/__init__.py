"""Long-running reliability and security drivers: load (stress.load), faults (stress.faults), fuzzing
(stress.fuzz), and the server launcher they share (stress.serve). Each is a CLI with bounded counts and
durations that talks only to loopback and prints its figures as JSON and a markdown summary.
Run from the repository root: `python -m stress.load --help`.
"""
