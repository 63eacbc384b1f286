"""The project's benchmarks: `python -m benchmarks --help`, from the project root. Not installed with the
package: they measure; the tests assert."""
