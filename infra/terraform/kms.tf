# One customer-managed key for the platform's data at rest: the data bucket, CloudWatch log
# groups, the database (storage, Performance Insights, master-password secret) and ECR.

data "aws_iam_policy_document" "kms" {
  #checkov:skip=CKV_AWS_109:Key policy: "*" is the key itself; admin stays with the account root so IAM policies govern use.
  #checkov:skip=CKV_AWS_111:Key policy: "*" is the key itself; writes are limited to the account root and CloudWatch Logs.
  #checkov:skip=CKV_AWS_356:Key policy: "*" is the key itself (a key policy cannot name other resources).
  statement {
    sid       = "AccountAdministersKeyThroughIam"
    actions   = ["kms:*"]
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }

  statement {
    sid = "CloudWatchLogsEncryptsPlatformLogGroups"
    actions = [
      "kms:Encrypt*",
      "kms:Decrypt*",
      "kms:ReEncrypt*",
      "kms:GenerateDataKey*",
      "kms:Describe*",
    ]
    resources = ["*"]

    principals {
      type        = "Service"
      identifiers = ["logs.${var.region}.amazonaws.com"]
    }

    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values = [
        "arn:${local.partition}:logs:${var.region}:${local.account_id}:log-group:/${var.name}/*",
        "arn:${local.partition}:logs:${var.region}:${local.account_id}:log-group:/aws/rds/instance/${local.db_identifier}/*",
      ]
    }
  }
}

resource "aws_kms_key" "platform" {
  description             = "${var.name}: data bucket, logs, database and image encryption"
  enable_key_rotation     = true
  rotation_period_in_days = 365
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
}

resource "aws_kms_alias" "platform" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.platform.key_id
}
