//! The keystore contract suite (STYLE rule 15): every test is written once
//! against `Arc<dyn KeyStore>` and runs against both SQLite and PostgreSQL
//! (`sqlite::…` and `postgres::…`), each on a fresh store. Tests only one
//! store can run live in `sqlite_only` and `postgres_only`.
//!
//! PostgreSQL: `KEYGATE_TEST_PG_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`; see `harness`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

mod audit;
mod coordination;
mod harness;
mod lifecycle;
mod postgres_only;
mod sqlite_only;
mod tenants;

/// Instantiates each `module::test` (an `async fn(Fixture)`) once per store.
macro_rules! for_each_store {
    ($($module:ident :: $test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    crate::$module::$test(crate::harness::Fixture::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    crate::$module::$test(crate::harness::Fixture::postgres().await).await;
                }
            )*
        }
    };
}

for_each_store!(
    tenants::creates_reads_and_refuses_duplicates,
    tenants::tenants_are_listed_in_bytewise_order,
    tenants::rotation_is_atomic_when_it_fails_midway,
    tenants::tenant_creation_is_all_or_nothing,
    tenants::the_database_itself_refuses_two_active_versions,
    tenants::concurrent_rotations_never_produce_two_active_versions,
    tenants::racing_tenant_creations_yield_one_tenant,
    tenants::state_changes_follow_the_rules,
    tenants::everything_survives_close_and_reopen,
    audit::audit_appends_are_atomic_and_ordered,
    audit::a_batch_with_a_duplicate_writes_nothing,
    audit::racing_appends_of_one_position_conflict,
    audit::large_batches_are_written_whole_or_not_at_all,
    audit::instances_are_listed_from_events_checkpoints_and_keys,
    audit::racing_first_starts_agree_on_one_signing_key,
    audit::signing_keys_survive_reopen,
    audit::chains_of_several_replicas_verify_together,
    audit::a_new_store_keeps_what_it_commits,
    coordination::job_locks_are_exclusive_across_stores,
    coordination::invalidations_follow_the_store_kind,
    lifecycle::shredding_erases_material_and_is_final,
    lifecycle::rotation_periods_are_stored,
    lifecycle::one_master_is_active_and_keys_move_by_compare_and_swap,
    lifecycle::usage_counts_add_up_per_version_and_hour,
    lifecycle::approvals_need_a_second_person_and_decide_once,
    lifecycle::the_database_refuses_self_approval,
    lifecycle::a_withdrawal_racing_an_execution_ends_one_way,
);
