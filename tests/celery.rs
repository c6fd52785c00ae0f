//! The Celery producer against a real Redis: keys per priority, the global key prefix,
//! first-in first-out order, and the envelope as a worker reads it.

use base64::Engine;
use ccat_workflow_manager::celery::{BrokerOptions, Producer, QUEUE_HPC, QUEUE_STAGING, Task};
use redis::AsyncCommands;
use serde_json::{Value, json};

fn redis_url() -> String {
    std::env::var("CCAT_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!("CCAT_TEST_REDIS_URL is not set: run the tests with `nox -s tests`")
    })
}

#[tokio::test]
async fn a_batch_lands_on_the_priority_lists_in_order_with_complete_envelopes() {
    let client = redis::Client::open(redis_url()).unwrap();
    let prefix = format!("test-celery-{}:", uuid::Uuid::new_v4());
    let options = BrokerOptions {
        global_keyprefix: prefix.clone(),
        ..Default::default()
    };
    let mut producer = Producer::connect(client.clone(), options).await.unwrap();
    let mut tasks = Vec::new();
    for (i, priority) in [0u8, 9, 4, 0].into_iter().enumerate() {
        let mut t = Task::new("ccat.probe", QUEUE_HPC, vec![json!(i)]);
        t.priority = priority;
        tasks.push(t);
    }
    tasks.push(Task::new(
        "ccat.probe",
        QUEUE_STAGING,
        vec![json!("staging")],
    ));
    producer.publish(&tasks).await.unwrap();

    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let read = |key: String| {
        let mut conn = conn.clone();
        async move {
            let raw: Vec<String> = conn.lrange(&key, 0, -1).await.unwrap();
            let _: () = conn.del(&key).await.unwrap();
            // Workers BRPOP: the oldest message is the last of the list.
            raw.iter()
                .rev()
                .map(|m| serde_json::from_str::<Value>(m).unwrap())
                .collect::<Vec<Value>>()
        }
    };
    let bucket0 = read(format!("{prefix}workflow.hpc")).await;
    let bucket3 = read(format!("{prefix}workflow.hpc\x06\x163")).await;
    let bucket9 = read(format!("{prefix}workflow.hpc\x06\x169")).await;
    let staging = read(format!("{prefix}workflow.staging")).await;

    let ids = |msgs: &[Value]| -> Vec<String> {
        msgs.iter()
            .map(|m| m["headers"]["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        ids(&bucket0),
        vec![tasks[0].id.clone(), tasks[3].id.clone()]
    );
    assert_eq!(ids(&bucket3), vec![tasks[2].id.clone()]);
    assert_eq!(ids(&bucket9), vec![tasks[1].id.clone()]);
    assert_eq!(ids(&staging), vec![tasks[4].id.clone()]);

    for m in bucket0
        .iter()
        .chain(&bucket3)
        .chain(&bucket9)
        .chain(&staging)
    {
        let p = &m["properties"];
        // The three fields whose absence makes a worker lose the message.
        assert!(p["delivery_tag"].is_string(), "{m}");
        assert_eq!(p["delivery_info"]["exchange"], "", "{m}");
        assert!(p["delivery_info"]["routing_key"].is_string(), "{m}");
        assert_eq!(p["body_encoding"], "base64", "{m}");
        let body = base64::engine::general_purpose::STANDARD
            .decode(m["body"].as_str().unwrap())
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert!(body[0].is_array() && body[1].is_object() && body[2].is_object());
    }
    assert_eq!(
        staging[0]["properties"]["delivery_info"]["routing_key"],
        "workflow.staging"
    );
}
