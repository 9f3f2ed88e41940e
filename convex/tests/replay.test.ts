// Replays and late arrivals. The service retries a call until Convex confirms it, so the same
// update can arrive twice, and after an outage updates can arrive out of order. video.ts promises
// (isStale): an update is dropped when it is older than what the row shows, i.e.
//   - same job: its updatedAt is earlier than the row's updatedAt (an equal one is applied again);
//   - another job: its createdAt is earlier than the row's createdAt (a newer job always wins).
// A dropped update answers {applied: false} and changes nothing, URLs and title included.
import { describe, expect, test } from "vitest";
import {
  CREATED,
  JOB,
  SECRET,
  TWITCH_ID,
  type T,
  allVideos,
  api,
  cancelledArgs,
  completedArgs,
  failedArgs,
  progressArgs,
  setup,
  videoRow,
  withoutSystemFields,
} from "./harness.setup";

const URLS_FINAL = {
  video_url: "https://storage.test/v.mp4",
  audio_url: "https://storage.test/a.mp3",
  transcript_url: "https://storage.test/segments.csv",
  transcriptUrl: "https://storage.test/segments.csv",
};

async function snapshot(t: T) {
  const rows = await allVideos(t);
  expect(rows).toHaveLength(1);
  return rows[0]!;
}

describe("the same update applied twice gives the same state", () => {
  const calls: [string, (t: T) => Promise<unknown>][] = [
    [
      "upsertJobProgress",
      (t) =>
        t.mutation(
          api.video.upsertJobProgress,
          progressArgs(CREATED + 5_000, "Transcribing", 40, {
            estimatedCompletionSeconds: 120,
            processingStartedAt: CREATED + 1_000,
            title: "Stream",
            urls: { audio_url: "https://storage.test/a.mp3" },
          }),
        ),
    ],
    [
      "markCompleted",
      (t) =>
        t.mutation(api.video.markCompleted, completedArgs(CREATED + 9_000, { urls: URLS_FINAL })),
    ],
    ["markFailed", (t) => t.mutation(api.video.markFailed, failedArgs(CREATED + 9_000, 61))],
    [
      "markCancelled",
      (t) => t.mutation(api.video.markCancelled, cancelledArgs(CREATED + 9_000, 33)),
    ],
  ];

  test.each(calls)("%s", async (_name, call) => {
    const t = setup();
    await t.mutation(api.video.upsertJobProgress, progressArgs(CREATED + 1_000, "Downloading", 5));
    expect(await call(t)).toEqual({ applied: true });
    const once = await snapshot(t);
    expect(await call(t)).toEqual({ applied: true }); // an equal updatedAt is not stale
    expect(await snapshot(t)).toEqual(once); // _id and _creationTime included: the same row
  });

  test("a replayed first update does not create a second row", async () => {
    const t = setup();
    const args = progressArgs(CREATED, "Queued", 0);
    await t.mutation(api.video.upsertJobProgress, args);
    await t.mutation(api.video.upsertJobProgress, args);
    await t.mutation(api.video.upsertJobProgress, args);
    expect(await allVideos(t)).toHaveLength(1);
  });
});

describe("an older update of the same job does not overwrite a newer one", () => {
  test("late progress after completion is dropped, URLs and title included", async () => {
    const t = setup();
    await t.mutation(
      api.video.markCompleted,
      completedArgs(CREATED + 9_000, { urls: URLS_FINAL, title: "Final" }),
    );
    const done = await snapshot(t);
    const late = await t.mutation(
      api.video.upsertJobProgress,
      progressArgs(CREATED + 8_999, "Finding highlights", 97, {
        estimatedCompletionSeconds: 3,
        title: "Stale title",
        urls: {
          video_url: "https://storage.test/stale.mp4",
          chat_url: "https://storage.test/stale.csv",
        },
      }),
    );
    expect(late).toEqual({ applied: false });
    expect(await snapshot(t)).toEqual(done);
    expect(done).toMatchObject({ status: "Completed", progressPercentage: 100, title: "Final" });
  });

  test("an older stage does not replace a newer stage", async () => {
    const t = setup();
    await t.mutation(api.video.upsertJobProgress, progressArgs(CREATED + 5_000, "Analyzing", 70));
    expect(
      await t.mutation(
        api.video.upsertJobProgress,
        progressArgs(CREATED + 2_000, "Downloading", 10),
      ),
    ).toEqual({ applied: false });
    expect(await videoRow(t, TWITCH_ID)).toMatchObject({
      status: "Analyzing",
      progressPercentage: 70,
      updatedAt: CREATED + 5_000,
    });
  });

  test.each([
    ["markFailed", (t: T) => t.mutation(api.video.markFailed, failedArgs(CREATED + 4_000, 50))],
    [
      "markCancelled",
      (t: T) => t.mutation(api.video.markCancelled, cancelledArgs(CREATED + 4_000, 50)),
    ],
    [
      "markCompleted",
      (t: T) => t.mutation(api.video.markCompleted, completedArgs(CREATED + 4_000)),
    ],
  ])("a late %s does not replace a newer state", async (_name, call) => {
    const t = setup();
    await t.mutation(
      api.video.upsertJobProgress,
      progressArgs(CREATED + 5_000, "Transcribing", 60),
    );
    const before = await snapshot(t);
    expect(await call(t)).toEqual({ applied: false });
    expect(await snapshot(t)).toEqual(before);
  });

  test("a newer update of the same job is applied", async () => {
    const t = setup();
    await t.mutation(
      api.video.upsertJobProgress,
      progressArgs(CREATED + 5_000, "Transcribing", 60),
    );
    expect(await t.mutation(api.video.markCompleted, completedArgs(CREATED + 5_001))).toEqual({
      applied: true,
    });
    expect(await videoRow(t, TWITCH_ID)).toMatchObject({
      status: "Completed",
      updatedAt: CREATED + 5_001,
    });
  });

  test("any arrival order ends in the state of the newest update", async () => {
    const sequence = [
      progressArgs(CREATED, "Queued", 0),
      progressArgs(CREATED + 1_000, "Downloading", 5, {
        processingStartedAt: CREATED + 1_000,
        title: "Stream",
      }),
      progressArgs(CREATED + 4_000, "Transcribing", 45, {
        processingStartedAt: CREATED + 1_000,
        title: "Stream",
        estimatedCompletionSeconds: 90,
        urls: { audio_url: URLS_FINAL.audio_url },
      }),
      completedArgs(CREATED + 9_000, {
        processingStartedAt: CREATED + 1_000,
        title: "Stream",
        urls: URLS_FINAL,
      }),
    ] as const;
    const apply = async (t: T, i: number) =>
      i === 3
        ? await t.mutation(api.video.markCompleted, sequence[3])
        : await t.mutation(
            api.video.upsertJobProgress,
            sequence[i] as ReturnType<typeof progressArgs>,
          );

    const inOrder = setup();
    for (const i of [0, 1, 2, 3]) await apply(inOrder, i);
    const expected = withoutSystemFields(await snapshot(inOrder));
    expect(expected).toMatchObject({
      status: "Completed",
      processingStartedAt: CREATED + 1_000,
      ...URLS_FINAL,
    });

    for (const order of permutations([0, 1, 2, 3])) {
      const t = setup();
      for (const i of order) await apply(t, i);
      expect(withoutSystemFields(await snapshot(t)), `arrival order ${order.join(",")}`).toEqual(
        expected,
      );
    }
  });
});

describe("an update from an older job does not overwrite a newer job", () => {
  const OLD_JOB = "job_old";
  const NEW_JOB = "job_new";
  const OLD_CREATED = CREATED;
  const NEW_CREATED = CREATED + 3_600_000;

  test("the old job's late failure, sent after the new job started, is dropped", async () => {
    const t = setup();
    await t.mutation(
      api.video.upsertJobProgress,
      progressArgs(OLD_CREATED + 1_000, "Downloading", 5, {
        jobId: OLD_JOB,
        createdAt: OLD_CREATED,
      }),
    );
    await t.mutation(
      api.video.upsertJobProgress,
      progressArgs(NEW_CREATED + 1_000, "Downloading", 8, {
        jobId: NEW_JOB,
        createdAt: NEW_CREATED,
      }),
    );
    const before = await snapshot(t);
    // The old job's terminal update was retried through an outage: its updatedAt is later than
    // anything the new job sent, but the job itself is older.
    const late = await t.mutation(
      api.video.markFailed,
      failedArgs(NEW_CREATED + 999_000, 5, { jobId: OLD_JOB, createdAt: OLD_CREATED }),
    );
    expect(late).toEqual({ applied: false });
    expect(await snapshot(t)).toEqual(before);
    expect(before).toMatchObject({ jobId: NEW_JOB, createdAt: NEW_CREATED, status: "Downloading" });
  });

  test("a newer job takes the row over, whatever the old job's last updatedAt", async () => {
    const t = setup();
    await t.mutation(
      api.video.markCompleted,
      completedArgs(OLD_CREATED + 9_000_000, {
        jobId: OLD_JOB,
        createdAt: OLD_CREATED,
        urls: URLS_FINAL,
      }),
    );
    // The new job's first update carries an updatedAt earlier than the old job's last one.
    const result = await t.mutation(
      api.video.upsertJobProgress,
      progressArgs(NEW_CREATED, "Queued", 0, { jobId: NEW_JOB, createdAt: NEW_CREATED }),
    );
    expect(result).toEqual({ applied: true });
    const row = await snapshot(t);
    expect(row).toMatchObject({
      jobId: NEW_JOB,
      createdAt: NEW_CREATED,
      updatedAt: NEW_CREATED,
      status: "Queued",
      progressPercentage: 0,
      ...URLS_FINAL, // the previous analysis's URLs stay until the new job replaces them
    });
    expect(row).not.toHaveProperty("processingCompletedAt");
  });

  test("then the newer job's own updates keep ordering by updatedAt", async () => {
    const t = setup();
    await t.mutation(
      api.video.upsertJobProgress,
      progressArgs(NEW_CREATED + 5_000, "Analyzing", 80, {
        jobId: NEW_JOB,
        createdAt: NEW_CREATED,
      }),
    );
    expect(
      await t.mutation(
        api.video.upsertJobProgress,
        progressArgs(NEW_CREATED + 1_000, "Downloading", 3, {
          jobId: NEW_JOB,
          createdAt: NEW_CREATED,
        }),
      ),
    ).toEqual({ applied: false });
    expect(await videoRow(t, TWITCH_ID)).toMatchObject({ jobId: NEW_JOB, status: "Analyzing" });
  });

  test("a job's update applies over a row the old system wrote (no job fields yet)", async () => {
    const t = setup();
    await t.mutation(api.video.updateStatusByTwitchId, {
      secret: SECRET,
      twitchId: TWITCH_ID,
      status: "Finalizing analysis",
    });
    expect(
      await t.mutation(api.video.upsertJobProgress, progressArgs(CREATED, "Queued", 0)),
    ).toEqual({
      applied: true,
    });
    expect(await videoRow(t, TWITCH_ID)).toMatchObject({ jobId: JOB, status: "Queued" });
  });
});

function permutations<X>(items: X[]): X[][] {
  if (items.length <= 1) return [items];
  return items.flatMap((item, i) =>
    permutations([...items.slice(0, i), ...items.slice(i + 1)]).map((rest) => [item, ...rest]),
  );
}
