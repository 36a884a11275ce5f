"""Turn the library's Great Expectations suite results into Dagster asset-check results."""

import dagster as dg

from curation_platform.quality import SuiteResult


def check_result(*results: SuiteResult, severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR,
                 **metadata) -> dg.AssetCheckResult:
    """Passed iff every expectation of every suite held; failed expectations travel as metadata for the UI."""
    return dg.AssetCheckResult(
        passed=all(result.success for result in results),
        severity=severity,
        metadata={
            "rows": results[0].rows,
            "rows_validated": results[0].rows_validated,
            "expectations": sum(len(result.outcomes) for result in results),
            "suites": dg.MetadataValue.json([result.to_metadata() for result in results]),
            **metadata,
        },
    )
