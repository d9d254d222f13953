"""MLPerf Training submission packaging: run directories -> the submission layout, checked by the official tools."""

from sd_mlperf.submission.package import PackageReport, PackagingError, format_report, package_runs

__all__ = ["PackageReport", "PackagingError", "format_report", "package_runs"]
