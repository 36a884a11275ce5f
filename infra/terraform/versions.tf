terraform {
  # 1.10 is the first release with S3-native state locking (use_lockfile).
  required_version = ">= 1.10.0"

  required_providers {
    # Pinned to the release in the offline provider mirror (/opt/tf-plugins) that CI validates
    # against; .terraform.lock.hcl records its checksum. Only the AWS provider is used: no
    # random/tls providers are needed because RDS manages the master password in Secrets Manager.
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.100.0"
    }
  }

  # Partial configuration: pass bucket/key/region with -backend-config at `terraform init`
  # (see infra/README.md). Tests run `terraform init -backend=false`.
  backend "s3" {}
}

provider "aws" {
  region = var.region

  default_tags {
    tags = local.tags
  }
}
