# ECS cluster: Fargate for the webserver, the daemon and CPU-only runs; an EC2 capacity provider
# of GPU instances (gpu.tf) for the default run worker. Every container runs the same image
# (infra/Dockerfile) as a non-root user on a read-only root filesystem with a task-scoped
# writable volume at /scratch (TMPDIR, caches, Dagster's local artifacts).

resource "aws_ecs_cluster" "this" {
  name = local.cluster_name

  setting {
    name  = "containerInsights"
    value = "enabled"
  }

  configuration {
    execute_command_configuration {
      kms_key_id = aws_kms_key.platform.arn
      logging    = "OVERRIDE"

      log_configuration {
        cloud_watch_encryption_enabled = true
        cloud_watch_log_group_name     = aws_cloudwatch_log_group.ecs["ecs_exec"].name
      }
    }
  }
}

resource "aws_ecs_cluster_capacity_providers" "this" {
  cluster_name       = aws_ecs_cluster.this.name
  capacity_providers = ["FARGATE", aws_ecs_capacity_provider.gpu.name]

  default_capacity_provider_strategy {
    capacity_provider = "FARGATE"
    weight            = 1
    base              = 0
  }
}

# ---------------------------------------------------------------------------------------------
# Container settings shared by every task
# ---------------------------------------------------------------------------------------------

locals {
  db_secret_arn = aws_db_instance.dagster.master_user_secret[0].secret_arn

  # Names match the `env:` references in infra/dagster.yaml and assets/resources.py.
  base_environment = merge(
    {
      AWS_REGION                      = var.region
      AWS_DEFAULT_REGION              = var.region
      DAGSTER_PG_HOST                 = aws_db_instance.dagster.address
      DAGSTER_PG_PORT                 = tostring(local.db_port)
      DAGSTER_PG_USER                 = aws_db_instance.dagster.username
      DAGSTER_PG_DB                   = aws_db_instance.dagster.db_name
      DAGSTER_COMPUTE_LOG_BUCKET      = aws_s3_bucket.data.id
      DAGSTER_COMPUTE_LOG_PREFIX      = local.prefix_compute_logs
      DAGSTER_ECS_CLUSTER             = local.cluster_name
      DAGSTER_ECS_RUN_TASK_DEFINITION = local.gpu_worker_family
      DAGSTER_ECS_RUN_CONTAINER       = local.run_container_name
      CURATION_HOME                   = "s3://${aws_s3_bucket.data.id}/${local.prefix_home}"
      CURATION_LANCEDB                = "s3://${aws_s3_bucket.data.id}/${local.prefix_lancedb}"
      CURATION_POOL                   = local.pool_uri
      CURATION_DEVICE                 = "cpu"
    },
    var.curation_teacher == "" ? {} : { CURATION_TEACHER = var.curation_teacher },
    var.curation_teacher_train_on == "" ? {} : { CURATION_TEACHER_TRAIN_ON = var.curation_teacher_train_on },
    var.curation_target == "" ? {} : { CURATION_TARGET = var.curation_target },
  )

  gpu_environment = merge(local.base_environment, { CURATION_DEVICE = "cuda" })

  # ECS returns environment entries sorted by name; sorting here avoids perpetual diffs.
  env_list = {
    cpu = [for k in sort(keys(local.base_environment)) : { name = k, value = local.base_environment[k] }]
    gpu = [for k in sort(keys(local.gpu_environment)) : { name = k, value = local.gpu_environment[k] }]
  }

  secrets = [
    { name = "DAGSTER_PG_PASSWORD", valueFrom = "${local.db_secret_arn}:password::" },
  ]

  scratch_mount = [{ sourceVolume = "scratch", containerPath = local.scratch_path, readOnly = false }]

  container_common = {
    image                  = local.image
    essential              = true
    user                   = "10001:10001"
    readonlyRootFilesystem = true
    privileged             = false
    secrets                = local.secrets
    mountPoints            = local.scratch_mount
    linuxParameters        = { initProcessEnabled = true }
    ulimits                = [{ name = "nofile", softLimit = 65536, hardLimit = 65536 }]
  }

  log_configuration = {
    for k, g in aws_cloudwatch_log_group.ecs : k => {
      logDriver = "awslogs"
      options = {
        awslogs-group         = g.name
        awslogs-region        = var.region
        awslogs-stream-prefix = k
      }
    }
  }
}

# ---------------------------------------------------------------------------------------------
# Task definitions
# ---------------------------------------------------------------------------------------------

resource "aws_ecs_task_definition" "webserver" {
  family                   = local.webserver_family
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.webserver_cpu
  memory                   = var.webserver_memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.webserver.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  ephemeral_storage {
    size_in_gib = 30
  }

  volume {
    name = "scratch"
  }

  container_definitions = jsonencode([merge(local.container_common, {
    name             = "webserver"
    command          = ["dagster-webserver", "-h", "0.0.0.0", "-p", tostring(local.webserver_port), "-m", "curation_platform_dagster.definitions"]
    environment      = local.env_list.cpu
    portMappings     = [{ name = "http", containerPort = local.webserver_port, protocol = "tcp" }]
    logConfiguration = local.log_configuration.webserver
    healthCheck = {
      command     = ["CMD", "python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${local.webserver_port}/server_info', timeout=5)"]
      interval    = 30
      timeout     = 10
      retries     = 3
      startPeriod = 300
    }
  })])
}

resource "aws_ecs_task_definition" "daemon" {
  family                   = local.daemon_family
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.daemon_cpu
  memory                   = var.daemon_memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.daemon.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  ephemeral_storage {
    size_in_gib = 30
  }

  volume {
    name = "scratch"
  }

  container_definitions = jsonencode([merge(local.container_common, {
    name             = "daemon"
    command          = ["dagster-daemon", "run", "-m", "curation_platform_dagster.definitions"]
    environment      = local.env_list.cpu
    logConfiguration = local.log_configuration.daemon
    healthCheck = {
      command     = ["CMD", "dagster-daemon", "liveness-check"]
      interval    = 60
      timeout     = 30
      retries     = 3
      startPeriod = 300
    }
  })])
}

# The default run worker: EcsRunLauncher (infra/dagster.yaml) launches every run with this
# task definition on the GPU capacity provider, overriding only the container command.
resource "aws_ecs_task_definition" "gpu_worker" {
  family                   = local.gpu_worker_family
  requires_compatibilities = ["EC2"]
  network_mode             = "awsvpc"
  cpu                      = var.gpu_worker_cpu
  memory                   = var.gpu_worker_memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.worker.arn

  volume {
    name = "scratch"

    docker_volume_configuration {
      scope  = "task"
      driver = "local"
    }
  }

  container_definitions = jsonencode([merge(local.container_common, {
    name                 = local.run_container_name
    environment          = local.env_list.gpu
    resourceRequirements = [{ type = "GPU", value = "1" }]
    logConfiguration     = local.log_configuration.gpu_worker
    stopTimeout          = 120
    linuxParameters = {
      initProcessEnabled = true
      sharedMemorySize   = 4096 # MiB of /dev/shm for data-loader worker processes
    }
  })])
}

# CPU-only run worker on Fargate, for runs without GPU steps (select it per run with the
# ecs/run_task_kwargs tag, see infra/README.md).
resource "aws_ecs_task_definition" "cpu_worker" {
  family                   = local.cpu_worker_family
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.cpu_worker_cpu
  memory                   = var.cpu_worker_memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.worker.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  ephemeral_storage {
    size_in_gib = 100
  }

  volume {
    name = "scratch"
  }

  container_definitions = jsonencode([merge(local.container_common, {
    name             = local.run_container_name
    environment      = local.env_list.cpu
    logConfiguration = local.log_configuration.cpu_worker
    stopTimeout      = 120
  })])
}

# ---------------------------------------------------------------------------------------------
# Services
# ---------------------------------------------------------------------------------------------

resource "aws_service_discovery_private_dns_namespace" "this" {
  name        = "${var.name}.internal"
  description = "Private DNS for the Dagster webserver (webserver.${var.name}.internal)"
  vpc         = data.aws_vpc.selected.id
}

resource "aws_service_discovery_service" "webserver" {
  name = "webserver"

  dns_config {
    namespace_id   = aws_service_discovery_private_dns_namespace.this.id
    routing_policy = "MULTIVALUE"

    dns_records {
      type = "A"
      ttl  = 10
    }
  }
}

resource "aws_ecs_service" "webserver" {
  name                   = "webserver"
  cluster                = aws_ecs_cluster.this.id
  task_definition        = aws_ecs_task_definition.webserver.arn
  desired_count          = 1
  launch_type            = "FARGATE"
  platform_version       = "LATEST"
  propagate_tags         = "SERVICE"
  enable_execute_command = false

  network_configuration {
    subnets          = var.private_subnet_ids
    security_groups  = [aws_security_group.webserver.id]
    assign_public_ip = false
  }

  service_registries {
    registry_arn = aws_service_discovery_service.webserver.arn
  }

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  depends_on = [aws_ecs_cluster_capacity_providers.this, aws_iam_role_policy.execution]
}

# Exactly one daemon may run: deployments stop the old task before starting the new one.
resource "aws_ecs_service" "daemon" {
  name                               = "daemon"
  cluster                            = aws_ecs_cluster.this.id
  task_definition                    = aws_ecs_task_definition.daemon.arn
  desired_count                      = 1
  launch_type                        = "FARGATE"
  platform_version                   = "LATEST"
  propagate_tags                     = "SERVICE"
  enable_execute_command             = false
  deployment_minimum_healthy_percent = 0
  deployment_maximum_percent         = 100

  network_configuration {
    subnets          = var.private_subnet_ids
    security_groups  = [aws_security_group.runner.id]
    assign_public_ip = false
  }

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  depends_on = [aws_ecs_cluster_capacity_providers.this, aws_iam_role_policy.execution]
}
