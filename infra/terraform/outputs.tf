output "cluster_name" {
  description = "ECS cluster running the webserver, the daemon and the run workers."
  value       = aws_ecs_cluster.this.name
}

output "gpu_capacity_provider" {
  description = "Capacity provider of the GPU run workers (must match run_task_kwargs.capacityProviderStrategy in infra/dagster.yaml)."
  value       = aws_ecs_capacity_provider.gpu.name
}

output "ecr_repository_url" {
  description = "Push the code-location image here (tag = var.image_tag)."
  value       = aws_ecr_repository.code.repository_url
}

output "data_bucket" {
  description = "Bucket with the project home, LanceDB tables, releases and Dagster compute logs."
  value       = aws_s3_bucket.data.id
}

output "access_log_bucket" {
  description = "Bucket receiving the data bucket's S3 server access logs."
  value       = aws_s3_bucket.access_logs.id
}

output "kms_key_arn" {
  description = "Customer-managed key encrypting the data bucket, logs, database and image repository."
  value       = aws_kms_key.platform.arn
}

output "db_endpoint" {
  description = "PostgreSQL host:port of the Dagster storage."
  value       = aws_db_instance.dagster.endpoint
}

output "db_master_secret_arn" {
  description = "Secrets Manager secret (JSON with username/password) that RDS manages for the master user."
  value       = local.db_secret_arn
}

output "webserver_dns_name" {
  description = "Private DNS name of the Dagster webserver inside the VPC (port 3000)."
  value       = "${aws_service_discovery_service.webserver.name}.${aws_service_discovery_private_dns_namespace.this.name}"
}

output "task_role_arns" {
  description = "IAM roles of the ECS tasks."
  value = {
    execution = aws_iam_role.execution.arn
    webserver = aws_iam_role.webserver.arn
    daemon    = aws_iam_role.daemon.arn
    worker    = aws_iam_role.worker.arn
  }
}

output "run_task_definitions" {
  description = "Task definition families of the run workers: the GPU one is the EcsRunLauncher default, the CPU one is selected per run with the ecs/run_task_kwargs tag."
  value = {
    gpu = aws_ecs_task_definition.gpu_worker.family
    cpu = aws_ecs_task_definition.cpu_worker.family
  }
}

output "dagster_environment" {
  description = "Environment the containers get (infra/dagster.yaml reads these); DAGSTER_PG_PASSWORD comes from db_master_secret_arn."
  value       = local.base_environment
}
