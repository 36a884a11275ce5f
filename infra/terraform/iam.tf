# Least-privilege roles:
#   execution  - ECS agent: pull the image, write container logs, read the database secret
#   webserver  - read the data bucket; describe/stop run tasks (cancelling a run in the UI)
#   daemon     - launch/monitor/stop run tasks on the worker task definitions, pass only the
#                worker and execution roles; read the pool (shard sensor) and the data bucket
#   worker     - task role of GPU and CPU run workers: read the pool, read/write the data
#                bucket's platform prefixes
#   gpu_host   - EC2 instance profile of the GPU container instances (ECS agent only)
#   rds_monitoring - RDS enhanced monitoring

locals {
  cluster_arn          = "arn:${local.partition}:ecs:${var.region}:${local.account_id}:cluster/${local.cluster_name}"
  cluster_tasks_arn    = "arn:${local.partition}:ecs:${var.region}:${local.account_id}:task/${local.cluster_name}/*"
  worker_task_def_arns = [for f in [local.gpu_worker_family, local.cpu_worker_family] : "arn:${local.partition}:ecs:${var.region}:${local.account_id}:task-definition/${f}:*"]
  worker_log_group_arns = [
    for k in ["gpu_worker", "cpu_worker"] : "${aws_cloudwatch_log_group.ecs[k].arn}:*"
  ]

  data_object_arns = [for p in local.data_write_prefixes : "${aws_s3_bucket.data.arn}/${p}/*"]
  pool_object_arn  = local.pool_prefix == "" ? "${local.pool_bucket_arn}/*" : "${local.pool_bucket_arn}/${local.pool_prefix}/*"
  db_iam_user_arn  = var.db_iam_username == null ? null : "arn:${local.partition}:rds-db:${var.region}:${local.account_id}:dbuser:${aws_db_instance.dagster.resource_id}/${var.db_iam_username}"
}

data "aws_iam_policy_document" "ecs_tasks_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }

    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = ["arn:${local.partition}:ecs:${var.region}:${local.account_id}:*"]
    }
  }
}

# ---------------------------------------------------------------------------------------------
# Reusable statements
# ---------------------------------------------------------------------------------------------

data "aws_iam_policy_document" "read_data" {
  # Unconditional on purpose: S3 answers a HEAD of a missing key with 404 only to callers that
  # may list the bucket (403 otherwise), and pyarrow's S3 filesystem -- behind every existence
  # check of the platform -- treats 403 as an error. A ListBucket statement narrowed by s3:prefix
  # does not count for that decision. Key names are listable; object reads stay prefix-scoped.
  statement {
    sid       = "ListDataBucket"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.data.arn]
  }

  statement {
    sid       = "ReadPlatformObjects"
    actions   = ["s3:GetObject", "s3:GetObjectVersion"]
    resources = local.data_object_arns
  }

  statement {
    sid       = "DecryptDataBucket"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.platform.arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${var.region}.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "read_pool" {
  # Unconditional for the same 404-versus-403 reason as ListDataBucket.
  statement {
    sid       = "ListPool"
    actions   = ["s3:ListBucket"]
    resources = [local.pool_bucket_arn]
  }

  statement {
    sid       = "ReadPoolShards"
    actions   = ["s3:GetObject"]
    resources = [local.pool_object_arn]
  }

  dynamic "statement" {
    for_each = var.pool_bucket_kms_key_arn == null ? [] : [var.pool_bucket_kms_key_arn]

    content {
      sid       = "DecryptPool"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]

      condition {
        test     = "StringLike"
        variable = "kms:ViaService"
        values   = ["s3.*.amazonaws.com"]
      }
    }
  }
}

data "aws_iam_policy_document" "observe_runs" {
  statement {
    sid       = "DescribeTaskDefinitions"
    actions   = ["ecs:DescribeTaskDefinition"]
    resources = ["*"] # DescribeTaskDefinition has no resource-level permissions
  }

  statement {
    sid       = "DescribeAndStopRunTasks"
    actions   = ["ecs:DescribeTasks", "ecs:StopTask"]
    resources = [local.cluster_tasks_arn]

    condition {
      test     = "ArnEquals"
      variable = "ecs:cluster"
      values   = [local.cluster_arn]
    }
  }

  statement {
    sid       = "ReadRunWorkerLogs"
    actions   = ["logs:GetLogEvents"]
    resources = local.worker_log_group_arns
  }
}

data "aws_iam_policy_document" "db_iam_connect" {
  count = var.db_iam_username == null ? 0 : 1

  statement {
    sid       = "ConnectAsDagsterIamUser"
    actions   = ["rds-db:connect"]
    resources = [local.db_iam_user_arn]
  }
}

# ---------------------------------------------------------------------------------------------
# Task execution role (ECS agent)
# ---------------------------------------------------------------------------------------------

resource "aws_iam_role" "execution" {
  name               = "${var.name}-ecs-execution"
  description        = "ECS agent: pull the code-location image, write container logs, inject the database password"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

data "aws_iam_policy_document" "execution" {
  statement {
    sid       = "EcrAuth"
    actions   = ["ecr:GetAuthorizationToken"]
    resources = ["*"] # GetAuthorizationToken has no resource-level permissions
  }

  statement {
    sid       = "PullCodeLocationImage"
    actions   = ["ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"]
    resources = [aws_ecr_repository.code.arn]
  }

  statement {
    sid       = "WriteContainerLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = [for k, g in aws_cloudwatch_log_group.ecs : "${g.arn}:*" if k != "ecs_exec"]
  }

  statement {
    sid       = "ReadDatabaseSecret"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [aws_db_instance.dagster.master_user_secret[0].secret_arn]
  }

  statement {
    sid       = "DecryptSecretAndImage"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.platform.arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["secretsmanager.${var.region}.amazonaws.com", "ecr.${var.region}.amazonaws.com"]
    }
  }
}

resource "aws_iam_role_policy" "execution" {
  name   = "execution"
  role   = aws_iam_role.execution.id
  policy = data.aws_iam_policy_document.execution.json
}

# ---------------------------------------------------------------------------------------------
# Webserver task role
# ---------------------------------------------------------------------------------------------

resource "aws_iam_role" "webserver" {
  name               = "${var.name}-webserver"
  description        = "Dagster webserver: read the data bucket, observe and cancel runs"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

data "aws_iam_policy_document" "webserver" {
  source_policy_documents = concat(
    [data.aws_iam_policy_document.read_data.json, data.aws_iam_policy_document.observe_runs.json],
    [for d in data.aws_iam_policy_document.db_iam_connect : d.json],
  )
}

resource "aws_iam_role_policy" "webserver" {
  name   = "webserver"
  role   = aws_iam_role.webserver.id
  policy = data.aws_iam_policy_document.webserver.json
}

# ---------------------------------------------------------------------------------------------
# Daemon task role
# ---------------------------------------------------------------------------------------------

resource "aws_iam_role" "daemon" {
  name               = "${var.name}-daemon"
  description        = "Dagster daemon: launch, monitor and stop run workers; read pool and data bucket"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

data "aws_iam_policy_document" "daemon_launch" {
  statement {
    sid       = "RunWorkerTasks"
    actions   = ["ecs:RunTask"]
    resources = local.worker_task_def_arns

    condition {
      test     = "ArnEquals"
      variable = "ecs:cluster"
      values   = [local.cluster_arn]
    }
  }

  statement {
    sid       = "TagTasksAtLaunch"
    actions   = ["ecs:TagResource"]
    resources = [local.cluster_tasks_arn]

    condition {
      test     = "StringEquals"
      variable = "ecs:CreateAction"
      values   = ["RunTask"]
    }
  }

  statement {
    sid       = "PassOnlyWorkerRoles"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.worker.arn, aws_iam_role.execution.arn]

    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ecs-tasks.amazonaws.com"]
    }
  }

  statement {
    sid       = "ReadOwnNetworkInterfaces"
    actions   = ["ec2:DescribeNetworkInterfaces"]
    resources = ["*"] # Describe* calls have no resource-level permissions
  }
}

# Sensor and schedule tick logs are captured by the compute log manager in the daemon's code
# server process: the daemon writes under the compute-log prefix only.
data "aws_iam_policy_document" "daemon_tick_logs" {
  statement {
    sid       = "WriteTickLogs"
    actions   = ["s3:PutObject", "s3:AbortMultipartUpload"]
    resources = ["${aws_s3_bucket.data.arn}/${local.prefix_compute_logs}/*"]
  }

  statement {
    sid       = "EncryptTickLogs"
    actions   = ["kms:GenerateDataKey"]
    resources = [aws_kms_key.platform.arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${var.region}.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "daemon" {
  source_policy_documents = concat(
    [
      data.aws_iam_policy_document.daemon_launch.json,
      data.aws_iam_policy_document.daemon_tick_logs.json,
      data.aws_iam_policy_document.observe_runs.json,
      data.aws_iam_policy_document.read_pool.json,
      data.aws_iam_policy_document.read_data.json,
    ],
    [for d in data.aws_iam_policy_document.db_iam_connect : d.json],
  )
}

resource "aws_iam_role_policy" "daemon" {
  name   = "daemon"
  role   = aws_iam_role.daemon.id
  policy = data.aws_iam_policy_document.daemon.json
}

# ---------------------------------------------------------------------------------------------
# Run worker task role (GPU and CPU workers)
# ---------------------------------------------------------------------------------------------

resource "aws_iam_role" "worker" {
  name               = "${var.name}-run-worker"
  description        = "Dagster run workers: read the pool, read and write the data bucket's platform prefixes"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

data "aws_iam_policy_document" "worker_write" {
  statement {
    sid = "WritePlatformObjects"
    actions = [
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = local.data_object_arns
  }

  statement {
    sid       = "EncryptDataBucket"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = [aws_kms_key.platform.arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${var.region}.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "worker" {
  source_policy_documents = concat(
    [
      data.aws_iam_policy_document.read_pool.json,
      data.aws_iam_policy_document.read_data.json,
      data.aws_iam_policy_document.worker_write.json,
    ],
    [for d in data.aws_iam_policy_document.db_iam_connect : d.json],
  )
}

resource "aws_iam_role_policy" "worker" {
  name   = "worker"
  role   = aws_iam_role.worker.id
  policy = data.aws_iam_policy_document.worker.json
}

# ---------------------------------------------------------------------------------------------
# GPU container instances
# ---------------------------------------------------------------------------------------------

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "gpu_host" {
  name               = "${var.name}-gpu-host"
  description        = "GPU container instances: register with the ECS cluster (tasks use their own roles)"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy_attachment" "gpu_host_ecs" {
  role       = aws_iam_role.gpu_host.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonEC2ContainerServiceforEC2Role"
}

resource "aws_iam_instance_profile" "gpu_host" {
  name = "${var.name}-gpu-host"
  role = aws_iam_role.gpu_host.name
}

# ---------------------------------------------------------------------------------------------
# RDS enhanced monitoring
# ---------------------------------------------------------------------------------------------

data "aws_iam_policy_document" "rds_monitoring_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["monitoring.rds.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "rds_monitoring" {
  name               = "${var.name}-rds-monitoring"
  description        = "RDS enhanced monitoring for the Dagster database"
  assume_role_policy = data.aws_iam_policy_document.rds_monitoring_assume.json
}

resource "aws_iam_role_policy_attachment" "rds_monitoring" {
  role       = aws_iam_role.rds_monitoring.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}
