# Security groups in the existing VPC. Nothing accepts traffic from the internet and nothing has
# a public IP. Three groups:
#   webserver: ingress 3000 only from var.webserver_ingress_cidrs
#   runner:    the daemon and every run worker (EcsRunLauncher copies the daemon's network
#              configuration onto the runs it launches); no ingress
#   gpu_host:  the GPU container instances themselves (ECS agent, image pulls); no ingress
#   database:  ingress 5432 from webserver and runner only

data "aws_vpc" "selected" {
  id = var.vpc_id
}

resource "aws_security_group" "webserver" {
  name        = "${var.name}-webserver"
  description = "Dagster webserver: UI ingress from allowed CIDRs, egress to AWS APIs and PostgreSQL"
  vpc_id      = data.aws_vpc.selected.id

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_security_group" "runner" {
  name        = "${var.name}-runner"
  description = "Dagster daemon and run workers: no ingress, egress to AWS APIs and PostgreSQL"
  vpc_id      = data.aws_vpc.selected.id

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_security_group" "gpu_host" {
  name        = "${var.name}-gpu-host"
  description = "GPU container instances: no ingress, HTTPS egress for the ECS agent and image pulls"
  vpc_id      = data.aws_vpc.selected.id

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_security_group" "database" {
  name        = "${var.name}-database"
  description = "Dagster PostgreSQL: ingress 5432 from the webserver and runner groups only"
  vpc_id      = data.aws_vpc.selected.id

  lifecycle {
    create_before_destroy = true
  }
}

# --- webserver -------------------------------------------------------------------------------

resource "aws_vpc_security_group_ingress_rule" "webserver_ui" {
  for_each = toset(var.webserver_ingress_cidrs)

  security_group_id = aws_security_group.webserver.id
  description       = "Dagster UI from ${each.value}"
  ip_protocol       = "tcp"
  from_port         = local.webserver_port
  to_port           = local.webserver_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "webserver_https" {
  for_each = toset(var.egress_https_cidrs)

  security_group_id = aws_security_group.webserver.id
  description       = "HTTPS to AWS APIs (S3, ECS, ECR, CloudWatch Logs, Secrets Manager)"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "webserver_db" {
  security_group_id            = aws_security_group.webserver.id
  description                  = "PostgreSQL (Dagster storage)"
  ip_protocol                  = "tcp"
  from_port                    = local.db_port
  to_port                      = local.db_port
  referenced_security_group_id = aws_security_group.database.id
}

# --- runner (daemon and run workers) -----------------------------------------------------------

resource "aws_vpc_security_group_egress_rule" "runner_https" {
  for_each = toset(var.egress_https_cidrs)

  security_group_id = aws_security_group.runner.id
  description       = "HTTPS to AWS APIs and S3 (pool, data bucket)"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "runner_db" {
  security_group_id            = aws_security_group.runner.id
  description                  = "PostgreSQL (Dagster storage)"
  ip_protocol                  = "tcp"
  from_port                    = local.db_port
  to_port                      = local.db_port
  referenced_security_group_id = aws_security_group.database.id
}

# --- GPU hosts -------------------------------------------------------------------------------

resource "aws_vpc_security_group_egress_rule" "gpu_host_https" {
  for_each = toset(var.egress_https_cidrs)

  security_group_id = aws_security_group.gpu_host.id
  description       = "HTTPS for the ECS agent, ECR image pulls and SSM parameters"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
}

# --- database --------------------------------------------------------------------------------

resource "aws_vpc_security_group_ingress_rule" "database_from" {
  for_each = {
    webserver = aws_security_group.webserver.id
    runner    = aws_security_group.runner.id
  }

  security_group_id            = aws_security_group.database.id
  description                  = "PostgreSQL from the ${each.key} group"
  ip_protocol                  = "tcp"
  from_port                    = local.db_port
  to_port                      = local.db_port
  referenced_security_group_id = each.value
}
