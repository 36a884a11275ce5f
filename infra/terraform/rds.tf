# PostgreSQL for Dagster's run, event-log and schedule storage. Private, encrypted with the
# platform key, TLS enforced, deletion-protected, backed up; the master password is generated
# and stored by RDS in Secrets Manager (manage_master_user_password), so it never appears in
# Terraform state. ECS injects it into containers as DAGSTER_PG_PASSWORD.

resource "aws_db_subnet_group" "dagster" {
  name        = local.db_identifier
  description = "Private subnets of the Dagster database"
  subnet_ids  = var.private_subnet_ids
}

resource "aws_db_parameter_group" "dagster" {
  name_prefix = "${local.db_identifier}-pg${var.db_engine_version}-"
  family      = "postgres${var.db_engine_version}"
  description = "Dagster PostgreSQL: TLS only, slow-statement and connection logging"

  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }

  parameter {
    name  = "log_min_duration_statement"
    value = "1000"
  }

  parameter {
    name  = "log_statement"
    value = "ddl"
  }

  parameter {
    name  = "log_connections"
    value = "1"
  }

  parameter {
    name  = "log_disconnections"
    value = "1"
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_db_instance" "dagster" {
  identifier     = local.db_identifier
  engine         = "postgres"
  engine_version = var.db_engine_version
  instance_class = var.db_instance_class

  db_name  = "dagster"
  username = "dagster"
  port     = local.db_port

  manage_master_user_password   = true
  master_user_secret_kms_key_id = aws_kms_key.platform.key_id

  iam_database_authentication_enabled = true

  allocated_storage     = var.db_allocated_storage_gb
  max_allocated_storage = var.db_max_allocated_storage_gb
  storage_type          = "gp3"
  storage_encrypted     = true
  kms_key_id            = aws_kms_key.platform.arn

  db_subnet_group_name   = aws_db_subnet_group.dagster.name
  vpc_security_group_ids = [aws_security_group.database.id]
  publicly_accessible    = false
  multi_az               = var.db_multi_az
  parameter_group_name   = aws_db_parameter_group.dagster.name

  backup_retention_period  = var.db_backup_retention_days
  backup_window            = "03:00-04:00"
  maintenance_window       = "sun:04:30-sun:05:30"
  copy_tags_to_snapshot    = true
  delete_automated_backups = false

  deletion_protection       = true
  skip_final_snapshot       = false
  final_snapshot_identifier = "${local.db_identifier}-final"

  auto_minor_version_upgrade  = true
  allow_major_version_upgrade = false
  apply_immediately           = false

  enabled_cloudwatch_logs_exports = ["postgresql", "upgrade"]
  monitoring_interval             = 60
  monitoring_role_arn             = aws_iam_role.rds_monitoring.arn

  performance_insights_enabled          = true
  performance_insights_kms_key_id       = aws_kms_key.platform.arn
  performance_insights_retention_period = 7

  depends_on = [aws_cloudwatch_log_group.rds]
}
