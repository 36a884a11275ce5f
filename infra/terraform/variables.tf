# ---------------------------------------------------------------------------------------------
# General
# ---------------------------------------------------------------------------------------------

variable "region" {
  description = "AWS region to deploy into (the pool bucket may live elsewhere)."
  type        = string

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.region))
    error_message = "region must look like us-east-1 or eu-west-2."
  }
}

variable "name" {
  description = "Name prefix for every resource (cluster, roles, buckets, log groups). The GPU capacity provider is called \"<name>-gpu\"; infra/dagster.yaml refers to it by that name."
  type        = string
  default     = "curation"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,18}[a-z0-9]$", var.name)) && !can(regex("^(aws|ecs|fargate)", var.name))
    error_message = "name must be 3-20 characters of lowercase letters, digits and hyphens, starting with a letter and not with aws, ecs or fargate (reserved for capacity provider names)."
  }
}

variable "tags" {
  description = "Extra tags applied to every resource through the provider's default_tags."
  type        = map(string)
  default     = {}
}

# ---------------------------------------------------------------------------------------------
# Network (bring your own VPC)
# ---------------------------------------------------------------------------------------------

variable "vpc_id" {
  description = "Existing VPC to deploy into. Its private subnets need a route to AWS APIs (NAT gateway or VPC endpoints for ECR, S3, ECS, CloudWatch Logs, Secrets Manager)."
  type        = string

  validation {
    condition     = can(regex("^vpc-[0-9a-f]{8,17}$", var.vpc_id))
    error_message = "vpc_id must be a VPC id (vpc-...)."
  }
}

variable "private_subnet_ids" {
  description = "Private subnets (at least two, in different availability zones) for the ECS tasks, the GPU instances and the RDS subnet group. Nothing gets a public IP."
  type        = list(string)

  validation {
    condition     = length(var.private_subnet_ids) >= 2 && alltrue([for s in var.private_subnet_ids : can(regex("^subnet-[0-9a-f]{8,17}$", s))])
    error_message = "private_subnet_ids must list at least two subnet ids (subnet-...)."
  }
}

variable "webserver_ingress_cidrs" {
  description = "CIDR blocks (VPN, bastion or internal load balancer ranges) allowed to reach the Dagster webserver on port 3000. Dagster OSS has no authentication: never open it to the internet. Empty: no ingress (use SSM port forwarding or add your own rule)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.webserver_ingress_cidrs : can(cidrnetmask(c)) && !contains(["0.0.0.0/0", "::/0"], c)])
    error_message = "webserver_ingress_cidrs must be IPv4 CIDR blocks and must not be 0.0.0.0/0."
  }
}

variable "egress_https_cidrs" {
  description = "Where tasks and GPU instances may open HTTPS (443) connections: AWS APIs through a NAT gateway need 0.0.0.0/0; with VPC endpoints only, narrow this to the VPC CIDR."
  type        = list(string)
  default     = ["0.0.0.0/0"]

  validation {
    condition     = length(var.egress_https_cidrs) > 0 && alltrue([for c in var.egress_https_cidrs : can(cidrnetmask(c))])
    error_message = "egress_https_cidrs must be a non-empty list of IPv4 CIDR blocks."
  }
}

# ---------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------

variable "pool_bucket_name" {
  description = "Existing bucket holding the raw pool shards (.tar/.parquet). Read-only for the platform; Terraform does not manage it."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.pool_bucket_name))
    error_message = "pool_bucket_name must be a valid S3 bucket name."
  }
}

variable "pool_prefix" {
  description = "Key prefix of the shards inside the pool bucket (\"\" for the whole bucket)."
  type        = string
  default     = ""

  validation {
    condition     = !startswith(var.pool_prefix, "/") && !strcontains(var.pool_prefix, "*")
    error_message = "pool_prefix must not start with / or contain wildcards."
  }
}

variable "pool_bucket_kms_key_arn" {
  description = "KMS key that encrypts the pool bucket, if it uses SSE-KMS (granted kms:Decrypt through S3 only). null for SSE-S3 or unencrypted pools."
  type        = string
  default     = null

  validation {
    condition     = var.pool_bucket_kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/", var.pool_bucket_kms_key_arn))
    error_message = "pool_bucket_kms_key_arn must be a KMS key ARN or null."
  }
}

variable "data_bucket_name" {
  description = "Name of the bucket Terraform creates for LanceDB tables, the project home, releases and Dagster compute logs. null: \"<name>-data-<account id>\"."
  type        = string
  default     = null

  validation {
    condition     = var.data_bucket_name == null || can(regex("^[a-z0-9][a-z0-9-]{1,49}[a-z0-9]$", var.data_bucket_name))
    error_message = "data_bucket_name must be 3-51 lowercase letters, digits or hyphens (the access-log bucket appends \"-access-logs\")."
  }
}

variable "noncurrent_version_retention_days" {
  description = "Days a superseded or deleted object version is kept in the data bucket before it expires (LanceDB compaction and cleanup make old files noncurrent)."
  type        = number
  default     = 30

  validation {
    condition     = var.noncurrent_version_retention_days >= 1 && var.noncurrent_version_retention_days <= 3650
    error_message = "noncurrent_version_retention_days must be between 1 and 3650."
  }
}

variable "access_log_retention_days" {
  description = "Days S3 server access logs are kept."
  type        = number
  default     = 365

  validation {
    condition     = var.access_log_retention_days >= 90
    error_message = "access_log_retention_days must be at least 90."
  }
}

# ---------------------------------------------------------------------------------------------
# Container image
# ---------------------------------------------------------------------------------------------

variable "image_tag" {
  description = "Tag of the code-location image (infra/Dockerfile) pushed to the ECR repository this stack creates. Tags are immutable: use a version or git sha, never \"latest\"."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$", var.image_tag)) && var.image_tag != "latest"
    error_message = "image_tag must be a valid image tag other than \"latest\"."
  }
}

# ---------------------------------------------------------------------------------------------
# ECS services and workers
# ---------------------------------------------------------------------------------------------

variable "webserver_cpu" {
  description = "Fargate CPU units of the webserver task (it also hosts the code location's gRPC subprocess)."
  type        = number
  default     = 1024

  validation {
    condition     = contains([512, 1024, 2048, 4096, 8192], var.webserver_cpu)
    error_message = "webserver_cpu must be one of 512, 1024, 2048, 4096, 8192."
  }
}

variable "webserver_memory" {
  description = "Fargate memory (MiB) of the webserver task; must be valid for webserver_cpu."
  type        = number
  default     = 4096

  validation {
    condition     = var.webserver_memory >= 2048 && var.webserver_memory <= 61440 && var.webserver_memory % 1024 == 0
    error_message = "webserver_memory must be a multiple of 1024 between 2048 and 61440 (the code location imports torch)."
  }
}

variable "daemon_cpu" {
  description = "Fargate CPU units of the daemon task (run queue, sensors, automation, run monitoring)."
  type        = number
  default     = 1024

  validation {
    condition     = contains([512, 1024, 2048, 4096, 8192], var.daemon_cpu)
    error_message = "daemon_cpu must be one of 512, 1024, 2048, 4096, 8192."
  }
}

variable "daemon_memory" {
  description = "Fargate memory (MiB) of the daemon task; must be valid for daemon_cpu."
  type        = number
  default     = 4096

  validation {
    condition     = var.daemon_memory >= 2048 && var.daemon_memory <= 61440 && var.daemon_memory % 1024 == 0
    error_message = "daemon_memory must be a multiple of 1024 between 2048 and 61440."
  }
}

variable "cpu_worker_cpu" {
  description = "Fargate CPU units of the CPU-only run worker (runs tagged onto it with ecs/run_task_kwargs, see README)."
  type        = number
  default     = 4096

  validation {
    condition     = contains([1024, 2048, 4096, 8192, 16384], var.cpu_worker_cpu)
    error_message = "cpu_worker_cpu must be one of 1024, 2048, 4096, 8192, 16384."
  }
}

variable "cpu_worker_memory" {
  description = "Fargate memory (MiB) of the CPU-only run worker; must be valid for cpu_worker_cpu."
  type        = number
  default     = 16384

  validation {
    condition     = var.cpu_worker_memory >= 2048 && var.cpu_worker_memory <= 122880 && var.cpu_worker_memory % 1024 == 0
    error_message = "cpu_worker_memory must be a multiple of 1024 between 2048 and 122880."
  }
}

variable "gpu_worker_cpu" {
  description = "CPU units reserved by one GPU run worker (1024 = 1 vCPU). Must fit the smallest gpu_instance_types entry with room for the ECS agent (g5.xlarge: 4 vCPU)."
  type        = number
  default     = 3584

  validation {
    condition     = var.gpu_worker_cpu >= 1024 && var.gpu_worker_cpu <= 196608
    error_message = "gpu_worker_cpu must be between 1024 and 196608."
  }
}

variable "gpu_worker_memory" {
  description = "Memory (MiB) reserved by one GPU run worker; must fit the smallest gpu_instance_types entry minus the agent's reservation (g5.xlarge: 16 GiB)."
  type        = number
  default     = 14336

  validation {
    condition     = var.gpu_worker_memory >= 4096
    error_message = "gpu_worker_memory must be at least 4096 MiB."
  }
}

variable "gpu_instance_types" {
  description = "GPU instance types for the GPU capacity provider, in order of preference (one GPU run worker per GPU)."
  type        = list(string)
  default     = ["g5.xlarge", "g5.2xlarge", "g6.xlarge"]

  validation {
    condition     = length(var.gpu_instance_types) > 0 && alltrue([for t in var.gpu_instance_types : can(regex("^(g4dn|g5|g6|g6e|gr6|p3|p3dn|p4d|p4de|p5|p5e|p5en)\\.[0-9a-z]+$", t))])
    error_message = "gpu_instance_types must be NVIDIA GPU instance types (g4dn, g5, g6, g6e, p3, p4d, p5 families)."
  }
}

variable "gpu_min_size" {
  description = "Minimum number of GPU instances (0 scales to zero when no run needs a GPU)."
  type        = number
  default     = 0

  validation {
    condition     = var.gpu_min_size >= 0
    error_message = "gpu_min_size must be >= 0."
  }
}

variable "gpu_max_size" {
  description = "Maximum number of GPU instances. Keep the Dagster \"gpu\" pool limit (concurrency.pools.default_limit in infra/dagster.yaml, or `dagster instance concurrency set gpu N`) at or below the GPUs this provides."
  type        = number
  default     = 4

  validation {
    condition     = var.gpu_max_size >= 1 && var.gpu_max_size <= 100 && var.gpu_max_size >= var.gpu_min_size
    error_message = "gpu_max_size must be between 1 and 100 and not below gpu_min_size."
  }
}

variable "gpu_on_demand_percentage" {
  description = "Percentage of GPU capacity above the base that is on-demand (the rest is Spot). Interrupted Spot runs are retried by Dagster run retries and resumed by run monitoring."
  type        = number
  default     = 100

  validation {
    condition     = var.gpu_on_demand_percentage >= 0 && var.gpu_on_demand_percentage <= 100
    error_message = "gpu_on_demand_percentage must be between 0 and 100."
  }
}

variable "gpu_root_volume_gb" {
  description = "Root EBS volume (GiB) of each GPU instance: holds the image layers (torch with CUDA is several GiB) and the tasks' scratch volumes."
  type        = number
  default     = 200

  validation {
    condition     = var.gpu_root_volume_gb >= 100 && var.gpu_root_volume_gb <= 16384
    error_message = "gpu_root_volume_gb must be between 100 and 16384."
  }
}

variable "gpu_ami_ssm_parameter" {
  description = "Public SSM parameter with the ECS GPU-optimised AMI id (NVIDIA driver and container toolkit preinstalled)."
  type        = string
  default     = "/aws/service/ecs/optimized-ami/amazon-linux-2023/gpu/recommended/image_id"

  validation {
    condition     = startswith(var.gpu_ami_ssm_parameter, "/aws/service/ecs/optimized-ami/") && strcontains(var.gpu_ami_ssm_parameter, "gpu")
    error_message = "gpu_ami_ssm_parameter must be an ECS GPU-optimised AMI parameter under /aws/service/ecs/optimized-ami/."
  }
}

variable "ebs_kms_key_arn" {
  description = "KMS key for the GPU instances' EBS volumes. null: the account's AWS-managed EBS key (avoids granting the Auto Scaling service-linked role access to the platform key)."
  type        = string
  default     = null

  validation {
    condition     = var.ebs_kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:", var.ebs_kms_key_arn))
    error_message = "ebs_kms_key_arn must be a KMS key ARN or null."
  }
}

variable "curation_teacher" {
  description = "CURATION_TEACHER for the code location (checkpoint URI or teacher directory). \"\": the platform trains its own teacher on curation_teacher_train_on."
  type        = string
  default     = ""
}

variable "curation_teacher_train_on" {
  description = "CURATION_TEACHER_TRAIN_ON: the trusted split (s3:// shards of clean pairs, in the pool or data bucket, which the task role reads) the platform trains its own teacher on when curation_teacher is \"\". \"\": the pool itself (lower teacher quality, see README)."
  type        = string
  default     = ""

  validation {
    condition     = var.curation_teacher_train_on == "" || can(regex("^s3://", var.curation_teacher_train_on))
    error_message = "curation_teacher_train_on must be an s3:// URI or \"\"."
  }
}

variable "curation_target" {
  description = "CURATION_TARGET: folder or shards of target images for NormSim (s3://...). \"\": NormSim columns stay empty unless the home has a demo target."
  type        = string
  default     = ""
}

# ---------------------------------------------------------------------------------------------
# Database
# ---------------------------------------------------------------------------------------------

variable "db_instance_class" {
  description = "RDS instance class of the Dagster run/event/schedule storage."
  type        = string
  default     = "db.t4g.medium"

  validation {
    condition     = startswith(var.db_instance_class, "db.")
    error_message = "db_instance_class must be an RDS instance class (db.*)."
  }
}

variable "db_engine_version" {
  description = "PostgreSQL major version (RDS picks the newest minor and upgrades minors automatically)."
  type        = string
  default     = "16"

  validation {
    condition     = contains(["14", "15", "16", "17"], var.db_engine_version)
    error_message = "db_engine_version must be a supported PostgreSQL major version: 14, 15, 16 or 17."
  }
}

variable "db_allocated_storage_gb" {
  description = "Initial storage (GiB) of the database; storage autoscaling grows it up to db_max_allocated_storage_gb."
  type        = number
  default     = 50

  validation {
    condition     = var.db_allocated_storage_gb >= 20
    error_message = "db_allocated_storage_gb must be at least 20."
  }
}

variable "db_max_allocated_storage_gb" {
  description = "Upper bound (GiB) of RDS storage autoscaling."
  type        = number
  default     = 500

  validation {
    condition     = var.db_max_allocated_storage_gb >= var.db_allocated_storage_gb
    error_message = "db_max_allocated_storage_gb must not be below db_allocated_storage_gb."
  }
}

variable "db_backup_retention_days" {
  description = "Days of automated RDS backups (point-in-time recovery window)."
  type        = number
  default     = 14

  validation {
    condition     = var.db_backup_retention_days >= 7 && var.db_backup_retention_days <= 35
    error_message = "db_backup_retention_days must be between 7 and 35."
  }
}

variable "db_multi_az" {
  description = "Run the database Multi-AZ (a standby in a second zone)."
  type        = bool
  default     = true
}

variable "db_iam_username" {
  description = "Database user that connects with IAM authentication (auth_provider aws_wif in dagster.yaml). null: password authentication only and no rds-db:connect grant. The user must exist with `GRANT rds_iam TO <user>`."
  type        = string
  default     = null

  validation {
    condition     = var.db_iam_username == null || can(regex("^[a-z_][a-z0-9_]{0,62}$", var.db_iam_username))
    error_message = "db_iam_username must be a PostgreSQL identifier or null."
  }
}

# ---------------------------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------------------------

variable "log_retention_days" {
  description = "Retention of the CloudWatch log groups (webserver, daemon, workers, ECS exec, RDS)."
  type        = number
  default     = 365

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be a retention period CloudWatch Logs accepts (1, 3, 5, 7, 14, 30, ..., 365, 400, 545, 731, ...)."
  }
}
