data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition

  tags = merge(var.tags, {
    Project   = "curation-platform"
    Component = var.name
    ManagedBy = "terraform"
  })

  data_bucket_name       = coalesce(var.data_bucket_name, "${var.name}-data-${local.account_id}")
  access_log_bucket_name = "${local.data_bucket_name}-access-logs"
  pool_bucket_arn        = "arn:${local.partition}:s3:::${var.pool_bucket_name}"

  # Prefixes of the data bucket (no leading or trailing slash). CURATION_HOME holds the
  # validated shards, analysis outputs, the trained teacher and curation.json.
  prefix_home         = "home"
  prefix_lancedb      = "lancedb"
  prefix_releases     = "releases"
  prefix_compute_logs = "dagster/compute-logs"

  # Everything a run writes; the webserver and daemon only read these.
  data_write_prefixes = [local.prefix_home, local.prefix_lancedb, local.prefix_releases, local.prefix_compute_logs]

  pool_prefix = trim(var.pool_prefix, "/")
  pool_uri    = local.pool_prefix == "" ? "s3://${var.pool_bucket_name}" : "s3://${var.pool_bucket_name}/${local.pool_prefix}"

  image = "${aws_ecr_repository.code.repository_url}:${var.image_tag}"

  cluster_name       = var.name
  gpu_worker_family  = "${var.name}-gpu-worker"
  cpu_worker_family  = "${var.name}-cpu-worker"
  webserver_family   = "${var.name}-webserver"
  daemon_family      = "${var.name}-daemon"
  run_container_name = "run"
  webserver_port     = 3000
  db_port            = 5432
  scratch_path       = "/scratch"
  db_identifier      = "${var.name}-dagster"
}
