# CloudWatch log groups, encrypted with the platform key (its policy admits log groups under
# /<name>/ only) and kept for var.log_retention_days.

locals {
  log_groups = {
    webserver  = "/${var.name}/ecs/webserver"
    daemon     = "/${var.name}/ecs/daemon"
    gpu_worker = "/${var.name}/ecs/gpu-worker"
    cpu_worker = "/${var.name}/ecs/cpu-worker"
    ecs_exec   = "/${var.name}/ecs/exec"
  }
}

resource "aws_cloudwatch_log_group" "ecs" {
  for_each = local.log_groups

  name              = each.value
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.platform.arn
}

# RDS exports into a fixed group name; creating it first sets retention and encryption
# (RDS would otherwise create it unencrypted with infinite retention).
resource "aws_cloudwatch_log_group" "rds" {
  for_each = toset(["postgresql", "upgrade"])

  name              = "/aws/rds/instance/${local.db_identifier}/${each.key}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.platform.arn
}
